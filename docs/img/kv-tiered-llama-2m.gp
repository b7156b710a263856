set terminal pngcairo size 900,750
set output 'docs/img/kv-tiered-llama-2m.png'
set xlabel 'KV cache held between steps (% of the full fp16 cache)'
set ylabel 'perplexity'
set key below
set grid
set xrange [0:105]
$run0 << EOD
100 131.697
EOD
$run1 << EOD
5.16633 146.749
10.3201 140.53
20.6275 136.557
41.255 133.939
EOD
$run2 << EOD
5.16633 150.865
10.3201 148.674
20.6275 144.911
41.255 139.908
EOD
$run3 << EOD
5.16633 149.425
10.3201 145.547
20.6275 139.109
41.255 133.947
EOD
$run4 << EOD
5.16633 146.81
10.3201 142.018
20.6275 137.479
41.255 133.361
EOD
$run5 << EOD
6.7525 138.587
11.9085 135.475
22.2152 133.85
41.2543 132.162
EOD
$run6 << EOD
6.7525 147.002
11.9085 141.108
22.2152 134.199
25.9569 133.212
EOD
$run7 << EOD
6.7525 138.947
11.9085 134.864
22.2152 133.874
23.4635 133.673
EOD
$run8 << EOD
6.7525 137.851
11.9085 134.691
22.2152 133.711
25.6972 132.859
EOD
$run9 << EOD
53.125 131.7
EOD
$run10 << EOD
41.9767 131.707
EOD
$run11 << EOD
31.4195 131.86
EOD
$run12 << EOD
19.1807 135.119
EOD
$run13 << EOD
23.6299 133.228
EOD
$run14 << EOD
22.8361 137.675
EOD
plot $run0 using 1:2 with linespoints title 'full', \
     $run1 using 1:2 with linespoints title 'streamingllm', \
     $run2 using 1:2 with linespoints title 'h2o', \
     $run3 using 1:2 with linespoints title 'scissorhands', \
     $run4 using 1:2 with linespoints title 'tova', \
     $run5 using 1:2 with linespoints title 'streamingllm tiered', \
     $run6 using 1:2 with linespoints title 'h2o tiered', \
     $run7 using 1:2 with linespoints title 'scissorhands tiered', \
     $run8 using 1:2 with linespoints title 'tova tiered', \
     $run9 using 1:2 with linespoints title 'int8', \
     $run10 using 1:2 with linespoints title 'kivi:bits=4', \
     $run11 using 1:2 with linespoints title 'kivi:bits=2', \
     $run12 using 1:2 with linespoints title 'streamingllm:budget=0.3 + kivi:bits=2', \
     $run13 using 1:2 with linespoints title 'streamingllm:budget=0.5 + kivi:bits=2', \
     $run14 using 1:2 with linespoints title 'h2o:budget=0.5 + kivi:bits=2'

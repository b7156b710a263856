set terminal pngcairo size 900,750
set output 'docs/img/kv-tiered-opt-3m.png'
set xlabel 'KV cache held between steps (% of the full fp16 cache)'
set ylabel 'perplexity'
set key below
set grid
set xrange [0:105]
$run0 << EOD
100 187.213
EOD
$run1 << EOD
5.15793 205.816
10.3159 198.921
20.6275 191.326
41.2508 189.782
EOD
$run2 << EOD
5.15793 209.472
10.3159 203.219
20.6275 196.502
41.2508 191.27
EOD
$run3 << EOD
5.15793 205.15
10.3159 201.415
20.6275 194.821
41.2508 191.048
EOD
$run4 << EOD
5.15793 200.596
10.3159 194.894
20.6275 191.511
41.2508 190.457
EOD
$run5 << EOD
6.74627 192.968
11.9041 189.599
22.2152 188.047
41.2505 187.609
EOD
$run6 << EOD
6.74627 196.681
11.9041 191.346
22.2152 187.915
23.5627 187.651
EOD
$run7 << EOD
6.74627 194.886
11.9041 191.049
22.2152 188.001
25.6944 187.772
EOD
$run8 << EOD
6.74627 191.125
11.9041 190.379
22.2152 188.222
24.4794 187.835
EOD
$run9 << EOD
53.125 187.216
EOD
$run10 << EOD
41.9767 187.235
EOD
$run11 << EOD
31.4195 187.54
EOD
$run12 << EOD
19.1704 190.921
EOD
$run13 << EOD
23.6299 188.503
EOD
$run14 << EOD
22.6244 190.229
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

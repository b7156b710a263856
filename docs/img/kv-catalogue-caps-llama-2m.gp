set terminal pngcairo size 900,750
set output 'docs/img/kv-catalogue-caps-llama-2m.png'
set xlabel 'KV cache held between steps (% of the full fp16 cache)'
set ylabel 'perplexity'
set key below
set grid
set xrange [0:105]
$run0 << EOD
100 131.697
EOD
$run1 << EOD
5.01512 136.908
10.0176 133.266
20.0227 132.07
EOD
$run2 << EOD
5.01512 146.12
10.0176 142.798
20.0227 137.839
EOD
$run3 << EOD
5.01512 146.088
10.0176 141.187
20.0227 135.032
EOD
$run4 << EOD
5.01512 138.745
10.0176 135.061
20.0227 132.457
EOD
$run5 << EOD
5.01512 148.292
10.0176 142.974
20.0227 138.497
EOD
$run6 << EOD
5.01512 143.733
10.0176 140.916
20.0227 137.49
EOD
$run7 << EOD
5.01512 150.076
10.0176 140.744
20.0227 135.814
EOD
$run8 << EOD
5.01512 139.965
10.0176 137.286
20.0227 134.556
EOD
$run9 << EOD
5.01512 152.43
10.0176 143.63
20.0227 137.5
EOD
$run10 << EOD
5.01512 151.475
10.0176 142.447
20.0227 136.346
EOD
$run11 << EOD
5.01512 144.344
10.0176 139.343
20.0227 135.582
EOD
$run12 << EOD
5.01512 147.196
10.0176 142.065
20.0227 136.951
EOD
plot $run0 using 1:2 with linespoints title 'full', \
     $run1 using 1:2 with linespoints title 'streamingllm', \
     $run2 using 1:2 with linespoints title 'h2o', \
     $run3 using 1:2 with linespoints title 'scissorhands', \
     $run4 using 1:2 with linespoints title 'tova', \
     $run5 using 1:2 with linespoints title 'knorm', \
     $run6 using 1:2 with linespoints title 'keydiff', \
     $run7 using 1:2 with linespoints title 'lagkv', \
     $run8 using 1:2 with linespoints title 'leverage', \
     $run9 using 1:2 with linespoints title 'cur', \
     $run10 using 1:2 with linespoints title 'expected', \
     $run11 using 1:2 with linespoints title 'random', \
     $run12 using 1:2 with linespoints title 'qfilters'

set terminal pngcairo size 900,750
set output 'docs/img/kv-catalogue-opt-3m.png'
set xlabel 'KV cache held between steps (% of the full fp16 cache)'
set ylabel 'perplexity'
set key below
set grid
set xrange [0:105]
$run0 << EOD
100 187.213
EOD
$run1 << EOD
10.3159 198.921
20.6275 191.326
51.5625 188.214
EOD
$run2 << EOD
10.3159 203.219
20.6275 196.502
51.5625 190.117
EOD
$run3 << EOD
10.3159 201.415
20.6275 194.821
51.5625 189.665
EOD
$run4 << EOD
10.3159 194.894
20.6275 191.511
51.5625 189.742
EOD
$run5 << EOD
10.3159 202.542
20.6275 198.312
51.5625 192.293
EOD
$run6 << EOD
10.3159 197.972
20.6275 193.855
51.5625 189.722
EOD
$run7 << EOD
10.3159 203.088
20.6275 196.317
51.5625 191.288
EOD
$run8 << EOD
10.3159 194.643
20.6275 191.79
51.5625 187.891
EOD
$run9 << EOD
10.3159 207.721
20.6275 200.627
51.5625 190.757
EOD
$run10 << EOD
10.3159 206.886
20.6275 213.113
51.5625 194.143
EOD
$run11 << EOD
10.3159 215.621
20.6275 203.76
51.5625 190.074
EOD
$run12 << EOD
10.3159 197.509
20.6275 191.132
51.5625 188.413
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
     $run10 using 1:2 with linespoints title 'qfilters', \
     $run11 using 1:2 with linespoints title 'expected', \
     $run12 using 1:2 with linespoints title 'random'

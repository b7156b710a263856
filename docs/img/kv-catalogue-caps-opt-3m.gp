set terminal pngcairo size 900,750
set output 'docs/img/kv-catalogue-caps-opt-3m.png'
set xlabel 'KV cache held between steps (% of the full fp16 cache)'
set ylabel 'perplexity'
set key below
set grid
set xrange [0:105]
$run0 << EOD
100 187.213
EOD
$run1 << EOD
5.00672 194.731
10.0134 188.657
20.0227 186.377
EOD
$run2 << EOD
5.00672 199.837
10.0134 199.414
20.0227 198.977
EOD
$run3 << EOD
5.00672 201.183
10.0134 194.89
20.0227 190.194
EOD
$run4 << EOD
5.00672 190.072
10.0134 187.932
20.0227 188.547
EOD
$run5 << EOD
5.00672 198.156
10.0134 193.657
20.0227 191.711
EOD
$run6 << EOD
5.00672 194.01
10.0134 191.197
20.0227 189.318
EOD
$run7 << EOD
5.00672 201.022
10.0134 197.261
20.0227 189.315
EOD
$run8 << EOD
5.00672 190.78
10.0134 190.081
20.0227 188.672
EOD
$run9 << EOD
5.00672 209.082
10.0134 200.731
20.0227 192.37
EOD
$run10 << EOD
5.00672 221.129
10.0134 210.699
20.0227 195.383
EOD
$run11 << EOD
5.00672 191.303
10.0134 188.665
20.0227 186.155
EOD
$run12 << EOD
5.00672 203.551
10.0134 204.72
20.0227 204.105
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

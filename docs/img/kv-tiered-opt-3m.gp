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
5.00672 194.731
10.0134 188.657
20.0227 186.377
40.0412 185.806
EOD
$run2 << EOD
5.00672 199.837
10.0134 199.414
20.0227 198.977
40.0412 195.298
EOD
$run3 << EOD
5.00672 201.183
10.0134 194.89
20.0227 190.194
40.0412 188.132
EOD
$run4 << EOD
5.00672 190.072
10.0134 187.932
20.0227 188.547
40.0412 188.212
EOD
$run5 << EOD
5.00672 194.741
10.0113 186.695
20.0223 187.462
40.0391 187.421
EOD
$run6 << EOD
5.00672 196.846
10.0134 194.928
20.0227 188.765
40.0411 187.245
EOD
$run7 << EOD
5.00672 196.919
10.0134 189.899
20.0227 187.194
40.0411 187.241
EOD
$run8 << EOD
5.00672 188.399
10.0134 188.238
20.0227 187.683
40.0411 187.381
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
23.7995 187.729
EOD
$run13 << EOD
19.1704 190.921
EOD
$run14 << EOD
15.1267 189.813
EOD
$run15 << EOD
9.85485 190.958
EOD
$run16 << EOD
6.57934 192.972
EOD
$run17 << EOD
16.0099 189.113
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
     $run12 using 1:2 with linespoints title 'kivi:bits=2,residual=32', \
     $run13 using 1:2 with linespoints title 'streamingllm:budget=0.3 + kivi:bits=2', \
     $run14 using 1:2 with linespoints title 'tova:budget=0.5 + kivi:bits=2,residual=32', \
     $run15 using 1:2 with linespoints title 'tova:budget=0.3 + kivi:bits=2,residual=16', \
     $run16 using 1:2 with linespoints title 'tova:budget=0.15 + kivi:bits=2,residual=16', \
     $run17 using 1:2 with linespoints title 'streamingllm:budget=0.5 + kivi:bits=2,residual=32'

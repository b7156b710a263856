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
5.01512 136.908
10.0176 133.266
20.0227 132.07
40.0454 131.597
EOD
$run2 << EOD
5.01512 146.12
10.0176 142.798
20.0227 137.839
40.0454 134.473
EOD
$run3 << EOD
5.01512 146.088
10.0176 141.187
20.0227 135.032
40.0454 131.677
EOD
$run4 << EOD
5.01512 138.745
10.0176 135.061
20.0227 132.457
40.0454 131.597
EOD
$run5 << EOD
4.98992 137.277
10.0171 132.459
20.0223 131.939
40.0446 131.782
EOD
$run6 << EOD
5.01512 142.187
10.0176 135.536
20.0227 132.791
40.0454 131.958
EOD
$run7 << EOD
5.01512 138.263
10.0176 132.208
20.0227 132.119
40.0454 131.779
EOD
$run8 << EOD
5.01512 135.499
10.0176 131.767
20.0227 132.269
40.0454 131.842
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
23.7995 132.167
EOD
$run13 << EOD
19.1807 135.119
EOD
$run14 << EOD
16.062 132.78
EOD
$run15 << EOD
10.0898 134.95
EOD
$run16 << EOD
6.89722 139.464
EOD
$run17 << EOD
16.0099 133.486
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

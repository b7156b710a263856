set terminal pngcairo size 900,750
set output 'docs/img/kv-catalogue-llama-2m.png'
set xlabel 'KV cache held between steps (% of the full fp16 cache)'
set ylabel 'perplexity'
set key below
set grid
set xrange [0:105]
$run0 << EOD
100 131.697
EOD
$run1 << EOD
10.3201 140.53
20.6275 136.557
51.5625 133.1
EOD
$run2 << EOD
10.3201 148.674
20.6275 144.911
51.5625 137.371
EOD
$run3 << EOD
10.3201 145.547
20.6275 139.109
51.5625 132.997
EOD
$run4 << EOD
10.3201 142.018
20.6275 137.479
51.5625 132.616
EOD
$run5 << EOD
10.3201 148.887
20.6275 144.988
51.5625 138.79
EOD
$run6 << EOD
10.3201 145.969
20.6275 144.194
51.5625 135.549
EOD
$run7 << EOD
10.3201 147.609
20.6275 141.4
51.5625 134.483
EOD
$run8 << EOD
10.3201 141.858
20.6275 139.027
51.5625 133.926
EOD
$run9 << EOD
10.3201 149.392
20.6275 144.635
51.5625 135.931
EOD
$run10 << EOD
10.3201 149.13
20.6275 143.402
51.5625 136.84
EOD
$run11 << EOD
10.3201 147.394
20.6275 143.776
51.5625 136.229
EOD
$run12 << EOD
10.3201 145.724
20.6275 141.799
51.5625 135.599
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

set datafile separator ','
set terminal pngcairo size 900,750
set output 'docs/img/kv-sweep-llama.png'
set xlabel 'KV cache held between steps (% of the full fp16 cache)'
set ylabel 'perplexity'
set key below
set grid
set xrange [0:105]
n = system("tail -n +2 docs/img/kv-sweep-llama.csv | cut -d, -f1 | awk '!seen[$0]++' | wc -l")
label(i) = system(sprintf("tail -n +2 docs/img/kv-sweep-llama.csv | cut -d, -f1 | awk '!seen[$0]++' | sed -n %dp", i))
plot for [i=1:n] sprintf("< grep '^%s,' docs/img/kv-sweep-llama.csv | sort -t, -k11 -g", label(i)) using ($11*100):4 with linespoints title label(i)

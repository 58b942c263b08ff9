"""Step-time overhead of each regularizer against plain optax SGD (see margin_regs.experiments.bench).

python benchmarks/run.py --json bench.json          # every case and model; timed at batch 128
python benchmarks/run.py --quick --models mlp cnn   # a noisy smoke run
python benchmarks/run.py --timed-batch-sizes        # XLA's cost model alone (batch 128, 4096)
python benchmarks/run.py --cases 'spectral*' --models mlp --rounds 100
python benchmarks/readme_table.py bench.json --write README.md
"""

import sys

from margin_regs.experiments.bench import main

if __name__ == "__main__":
    sys.exit(main())

"""Step-time overhead of each regularizer against plain optax SGD (see margin_regs.experiments.bench).

python benchmarks/run.py            # all cases, both models (a few minutes)
python benchmarks/run.py --quick    # a noisy smoke run
python benchmarks/run.py --cases 'spectral*' --models mlp --rounds 100
"""

import sys

from margin_regs.experiments.bench import main

if __name__ == "__main__":
    sys.exit(main())

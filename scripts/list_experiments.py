"""Prints every registered experiment with its one-line description.

python scripts/list_experiments.py
"""

from absl import app

import experiments


def main(argv):
    del argv
    width = max(len(name) for name in experiments.EXPERIMENTS)
    for name in experiments.EXPERIMENTS:
        config = experiments.get(name)
        print(f"{name:<{width}}  {config.description}")


if __name__ == "__main__":
    app.run(main)

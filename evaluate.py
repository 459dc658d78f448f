"""Lifelong evaluation of an editor: `python evaluate.py checkpoint=PATH data=counterfact num_steps=50 edits_per_step=20`.

With no arguments it edits the synthetic world's tiny model with the training-free editor (no download,
no GPU, no checkpoint). Options and their defaults: configs/evaluate.yaml.
"""

from rledit.cli import evaluate_main as main

if __name__ == "__main__":
    main()

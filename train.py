"""Train an editor: `python train.py` trains RLEdit on the embedded synthetic world (options: configs/train.yaml)."""

from rledit.cli import train_main as main

if __name__ == "__main__":
    main()

"""`python train.py [overrides]`: train scProto; see configs/train.yaml and README.md."""

from scproto.train import main

if __name__ == "__main__":
    main()

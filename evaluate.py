"""Re-evaluate a finished run: `python evaluate.py run_dir=outputs/train/runs/<time>`."""

from scproto.evaluate import main

if __name__ == "__main__":
    main()

"""Fine-tuning stage: labelled / teacher-labelled pairs -> a dense dual encoder.

`python -m finetune.run --recipe NAME` (or `accelerate launch finetune/run.py --recipe NAME`);
`python -m finetune.mine` writes hard negatives. See finetune/args.py for the recipe schema.
"""

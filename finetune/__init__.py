"""Fine-tuning stage: labelled / teacher-labelled pairs -> a dense dual encoder.

`python -m twotower.finetune.run --recipe NAME` (or `accelerate launch finetune/run.py --recipe NAME`);
`python -m twotower.finetune.mine` writes hard negatives. See finetune/args.py for the recipe schema.
"""

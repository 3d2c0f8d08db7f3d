"""Reports: diagnostics, analysis, plots, comparing runs; the Trainer's callbacks for recipe.eval
and the saved model's card."""

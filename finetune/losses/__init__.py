"""One module per fine-tuning loss; each computes from embeddings (GroupEmbeddings) and returns
(unweighted loss, extra stats). Weights and hyperparameters come from finetune.args.LossArgs."""
from finetune.losses.base import GroupEmbeddings
from finetune.losses.dance_dual import DanceDual
from finetune.losses.infonce import InfoNCE
from finetune.losses.margin_mse import MarginMSE
from finetune.losses.margin_mse_dual import MarginMSEDual
from finetune.losses.pair import Pair
from finetune.losses.samtone import SamToNe

LOSSES = {cls.name: cls for cls in (InfoNCE, DanceDual, SamToNe, Pair, MarginMSE, MarginMSEDual)}

__all__ = ["LOSSES", "GroupEmbeddings", "InfoNCE", "DanceDual", "SamToNe", "Pair", "MarginMSE",
           "MarginMSEDual"]

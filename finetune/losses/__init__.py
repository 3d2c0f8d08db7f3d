"""One module per fine-tuning loss; each computes from embeddings (GroupEmbeddings) and returns
(unweighted loss, extra stats). Weights and hyperparameters come from twotower.finetune.args.LossArgs."""
from twotower.finetune.losses.base import GroupEmbeddings
from twotower.finetune.losses.dance_dual import DanceDual
from twotower.finetune.losses.infonce import InfoNCE
from twotower.finetune.losses.listwise_kl import ListwiseKL
from twotower.finetune.losses.margin_mse import MarginMSE
from twotower.finetune.losses.margin_mse_dual import MarginMSEDual
from twotower.finetune.losses.pair import Pair
from twotower.finetune.losses.samtone import SamToNe

LOSSES = {cls.name: cls for cls in (InfoNCE, DanceDual, SamToNe, Pair, MarginMSE, MarginMSEDual,
                                    ListwiseKL)}

__all__ = ["LOSSES", "GroupEmbeddings", "InfoNCE", "DanceDual", "SamToNe", "Pair", "MarginMSE",
           "MarginMSEDual", "ListwiseKL"]

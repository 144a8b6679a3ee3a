"""Distillation: a teacher's outputs -> stock students that every library serves.

- ``config``: the YAML config (``configs/distill_score.yaml``, ``configs/distill_esci.yaml``);
- ``data``: the distillation pairs (train+val plus unlabelled pairs; never the test split);
- ``teacher``: the teacher's outputs per pair, grouped per candidate list and cached;
- ``student``: the two students (``score``: 1 logit; ``esci``: 4 logits E/S/C/I) and training;
- ``run``: ``distill(teacher, config, out)``, what ``esci-reranker distill`` runs;
- ``cv``: students cross-validated against the teacher's out-of-fold outputs
  (``esci-reranker distill-cv``).

A student is saved as a stock transformers ``BertForSequenceClassification`` folder
(``model.stock``): transformers, sentence-transformers and text-embeddings-inference load it
with no code of ours, ``Reranker.from_pretrained`` loads it as one of our models, and
``esci-reranker export`` writes it in each library's format (``model.export``, ``model.onnx``).
"""

from esci_reranker.distill.config import DistillConfig, load_distill_config
from esci_reranker.distill.cv import DISTILL_CV_MODELS, cross_validate_student, teacher_oof_table
from esci_reranker.distill.data import DistillPairs, TestLeakError, check_no_test_leak, distillation_pairs
from esci_reranker.distill.run import DistillResult, distill
from esci_reranker.distill.student import StudentResult, train_student
from esci_reranker.distill.teacher import TEACHER_COLUMNS, TeacherOutputs, teacher_outputs

__all__ = [
    "DISTILL_CV_MODELS",
    "TEACHER_COLUMNS",
    "DistillConfig",
    "DistillPairs",
    "DistillResult",
    "StudentResult",
    "TeacherOutputs",
    "TestLeakError",
    "check_no_test_leak",
    "cross_validate_student",
    "distill",
    "distillation_pairs",
    "load_distill_config",
    "teacher_oof_table",
    "teacher_outputs",
    "train_student",
]

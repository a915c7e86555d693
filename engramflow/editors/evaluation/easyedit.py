"""EasyEdit's token accuracy, on any dataset: reliability, generalization and locality.

Rows carry protocol `easyedit`. The definitions are the zsRE protocol's (`zsre.TokenAccuracy`: locality
against the unedited model's predictions), under EasyEdit's names; on CounterFact they are token
accuracies where the `counterfact` protocol compares probabilities, so the numbers are not comparable.
"""

from __future__ import annotations

from engramflow.editors.evaluation import register
from engramflow.editors.evaluation.zsre import TokenAccuracy

register(TokenAccuracy(
    name="easyedit", protocol="easyedit",
    source="EasyEdit (Wang et al. 2024), compute_rewrite_quality_* token accuracy",
    names=("easyedit_rel", "easyedit_gen", "easyedit_loc"),
    metrics={
        "easyedit_rel": "reliability: teacher-forced top-1 accuracy of target_new's tokens on the edit prompt",
        "easyedit_gen": "generalization: the same, mean over rephrased prompts",
        "easyedit_loc": "locality: share of locality target tokens whose top-1 prediction is the unedited model's",
    },
))

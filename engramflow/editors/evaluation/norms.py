"""Weight-norm growth of the edited matrices: the steady growth that precedes collapse.

Model-level rows, protocol `model`, per edited layer L (from `EvalContext.originals`, W0 of the MLP
output projection): `rel_norm.L<L>` and `norm_ratio.L<L>`. No rows for an unedited model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engramflow.editors.adapters import adapter_for
from engramflow.editors.evaluation import register
from engramflow.editors.evaluation.base import EvalContext, Evaluator, Row


@dataclass(frozen=True, eq=False)
class Norms(Evaluator):
    @torch.no_grad()
    def __call__(self, ctx: EvalContext) -> list[Row]:
        if not ctx.originals:
            return []
        adapter = adapter_for(ctx.model)
        values: dict[str, float | None] = {}
        for layer, original in sorted(ctx.originals.items()):
            w0 = original.double()
            w = adapter.down_weight(ctx.model, layer).detach().to(w0.device).double()
            base = torch.linalg.matrix_norm(w0).item()
            values[f"rel_norm.L{layer}"] = torch.linalg.matrix_norm(w - w0).item() / base
            values[f"norm_ratio.L{layer}"] = torch.linalg.matrix_norm(w).item() / base
        return self.rows(None, values)


register(Norms(
    name="norms", protocol="model",
    source="Gupta et al. 2024 (Model Editing at Scale leads to Gradual and Catastrophic Forgetting): norm growth",
    metrics={
        "rel_norm.L<layer>": "‖W − W0‖_F / ‖W0‖_F of the layer's MLP output projection",
        "norm_ratio.L<layer>": "‖W‖_F / ‖W0‖_F of the same matrix",
    },
))

"""A registered block as an MLflow pyfunc model, logged as code (models-from-code: no pickle).

``predict({"z": ..., "sigma": (N,) or scalar, **cond})`` (typed ``TypeFromExample``: MLflow passes the dict
through, without validation or a warning) is the block's denoiser D(z, sigma, **cond)
(``Family.denoiser``): for the DiT ``cond`` is ``labels`` (N,) and D the denoised
image; for the ViT ``images``; for the AR family ``context`` (N, T) token ids. Integer arrays
become int64 tensors, the rest float32. ``.net``/``.spec``/``.meta`` give the network itself (an
end-to-end baseline that is not a denoiser is used through ``.net``).
"""

import mlflow
import numpy as np
import torch
from mlflow.types.type_hints import TypeFromExample

from dblocks.build import block_from_export, export_levels
from dblocks.checkpoint import load_checkpoint
from dblocks.families import get_family


class BlockPyfunc(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        tensors, self.meta = load_checkpoint(context.artifacts["block"])
        self.net, self.spec = block_from_export(tensors, self.meta)
        self.family = get_family(self.meta["model"]["family"])

    def predict(self, context, model_input: TypeFromExample, params=None):
        if self.meta.get("baseline") and not self.family.baseline_is_denoiser:
            raise TypeError(
                f"the end-to-end {self.family.name} baseline is not a denoiser; use .unwrap_python_model().net"
            )
        z = torch.as_tensor(np.asarray(model_input["z"]), dtype=torch.float32)
        sigma = torch.as_tensor(np.asarray(model_input["sigma"]), dtype=torch.float32).expand(len(z))
        cond = {k: _tensor(v) for k, v in model_input.items() if k not in ("z", "sigma")}
        denoiser = self.family.denoiser(self.net, export_levels(self.meta))
        with torch.no_grad():
            return denoiser(z, sigma, **cond).numpy()


def _tensor(value) -> torch.Tensor:
    a = np.asarray(value)
    return torch.as_tensor(a, dtype=torch.int64 if np.issubdtype(a.dtype, np.integer) else torch.float32)


mlflow.models.set_model(BlockPyfunc())

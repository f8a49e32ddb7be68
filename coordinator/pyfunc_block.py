"""A registered block as an MLflow pyfunc model, logged as code (models-from-code: no pickle).

``predict({"z": ..., "sigma": (N,), **cond})`` is the block's denoiser D(z, sigma, **cond)
(``Family.denoiser``); the model's signature names each array with its dtype and shape
(``Family.predict_arrays``): for the DiT ``cond`` is ``labels`` (N,) and D the denoised image; for
the ViT ``images``; for the AR family ``context`` (N, T) token ids; for the MDM family the reverse
step from t (``sigma``) to ``s`` with its draws ``u`` and ``gumbel``. ``.net``/``.spec``/``.meta``
give the network itself (an end-to-end baseline that is not a denoiser is used through ``.net``).
"""

import mlflow
import numpy as np
import torch

from dblocks.build import block_from_export, export_arrays, export_levels
from dblocks.checkpoint import load_checkpoint
from dblocks.families import get_family


class BlockPyfunc(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        tensors, self.meta = load_checkpoint(context.artifacts["block"])
        self.net, self.spec = block_from_export(tensors, self.meta)
        self.family = get_family(self.meta["model"]["family"])
        self.arrays = export_arrays(self.meta)

    # ``model_input`` is a dict of named arrays. The annotation is numpy's because with it MLflow infers
    # no schema of its own and enforces the logged signature (named tensors) before this is called.
    def predict(self, context, model_input: np.ndarray, params=None):
        if self.arrays is None:
            raise TypeError(
                f"the end-to-end {self.family.name} baseline is not a denoiser; use .unwrap_python_model().net"
            )
        inputs, output = self.arrays
        x = {k: torch.as_tensor(np.asarray(model_input[k]), dtype=a.dtype) for k, a in inputs.items()}
        z, sigma = x.pop("z"), x.pop("sigma")
        denoiser = self.family.denoiser(self.net, export_levels(self.meta))
        with torch.no_grad():
            return denoiser(z, sigma.reshape(-1).expand(len(z)), **x).to(output.dtype).numpy()


mlflow.models.set_model(BlockPyfunc())

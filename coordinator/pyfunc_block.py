"""A registered block as an MLflow pyfunc model, logged as code (models-from-code: no pickle).

``predict({"z": (N, C, H, W), "sigma": (N,) or scalar, "labels": (N,)})`` is the block's
EDM-preconditioned denoiser D(z, sigma); ``.net``/``.spec``/``.meta`` give the network itself.
"""

import warnings

import mlflow
import numpy as np
import torch

from dblocks.build import block_from_export
from dblocks.checkpoint import load_checkpoint
from dblocks.precond import denoise

with warnings.catch_warnings():  # predict takes a dict of arrays: no type hints for MLflow to check
    warnings.filterwarnings("ignore", message=".*type hints.*")

    class BlockPyfunc(mlflow.pyfunc.PythonModel):
        def load_context(self, context) -> None:
            tensors, self.meta = load_checkpoint(context.artifacts["block"])
            self.net, self.spec = block_from_export(tensors, self.meta)

        def predict(self, context, model_input, params=None):
            z = torch.as_tensor(np.asarray(model_input["z"]), dtype=torch.float32)
            sigma = torch.as_tensor(np.asarray(model_input["sigma"]), dtype=torch.float32).expand(len(z))
            labels = torch.as_tensor(np.asarray(model_input["labels"]), dtype=torch.int64)
            with torch.no_grad():
                return denoise(self.net, z, sigma, labels, sigma_data=self.meta["noise"]["sigma_data"]).numpy()


mlflow.models.set_model(BlockPyfunc())

"""Serving an artifact on NVIDIA Triton Inference Server (issue 19). No torch.

- `repository.write_repository(artifact, out)`: a Triton model repository (Python backend) that runs the Pipeline;
  `anchorrt serve triton ARTIFACT -o REPO` calls it.
- `model.py`: the Python-backend model (copied into the repository; imports numpy, the runtime and
  `triton_python_backend_utils`, never torch).
- `params`: per-request Triton parameters <-> the Pipeline's sampling options and mitigation dict.
- `server.LocalTriton`: a loopback `tritonserver` from the `nvidia-pytriton` wheel (`anchorrt serve ARTIFACT`).
- `client.AnchorClient`: a `tritonclient` request with an image, a prompt and mitigation flags.
"""

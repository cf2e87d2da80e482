"""VisAlign: visually refined text embeddings (`papers/visalign-refining-textual-embeddings.txt`; METHODS.md).

Every text token embedding `e_t` (system, instruction and generated tokens alike) becomes
`e'_t = W [e_t ; v_bar] + b`, `W` d x 2d, `v_bar` the mean of the request's projected visual tokens.

- `fusion.py`      the fusion module (init `[I | 0]`, 0 or xavier) and its weights file
- `checkpoint.py`  the checkpoint format: the HF LLaVA folder + `visalign.safetensors` + a config.json entry;
                   the export hook that bakes the fusion into the embed graph
- `reference.py`   the PyTorch reference: the transformers model with the fusion on every text embedding
- `data.py`        LLaVA-format training data: checks, prompt format, answer-only labels
- `train.py`       the two-stage trainer (`anchorrt visalign train`)

Importing this package imports nothing heavy; torch comes with `fusion`, `reference` and `train`.
"""

"""The engine's default forward for one training batch (shared by the engine and the preservation hook, so neither
imports the other)."""

import torch


def forward_batch(model, batch, output_hidden_states=False):
    """The default forward: ``model(input_ids, attention_mask, tower=...)`` without a KV cache."""
    kwargs = {"input_ids": batch["input_ids"], "use_cache": False}
    if batch.get("attention_mask") is not None:
        kwargs["attention_mask"] = batch["attention_mask"]
    if output_hidden_states:
        kwargs["output_hidden_states"] = True
    tower = batch.get("tower")
    if tower is not None:
        towers = torch.as_tensor(tower).reshape(-1).unique()
        if towers.numel() != 1:
            raise ValueError(f"batch['tower'] holds several towers {towers.tolist()}: group batches by tower or "
                             "pass forward= to train_student")
        kwargs["tower"] = int(towers.item())
    return model(**kwargs)

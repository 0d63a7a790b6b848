"""A tiny random Llama with two capabilities wired into known units by construction (used by test_localise and by
bench/localise_real.py for the cost-vs-depth measurement).

- ``digits`` (exact match: ``...KLM3`` -> ``6``): ten FFN neurons, one per digit, alternating between two layers;
  each reads its digit's embedding (gate and up rows) and writes the unembedding of (digit + 3) % 10 (down column);
- ``markers`` (exact match: a marker such as ``?`` somewhere in the prompt -> its letter): one attention head that
  attends uniformly (zero queries), reads the four marker embeddings (value rows) and writes the letters'
  unembeddings (output columns). Marker embeddings are orthogonal to every other token's, so the head is silent on
  prompts without a marker.

Every other weight is noise of scale ``background / sqrt(hidden)``. ``general`` (random letters) is data the model
is at chance on.
"""

import json
import random
import string

import torch
from conftest import char_tokenizer
from transformers import LlamaConfig, LlamaForCausalLM

DIGITS, LETTERS, MARKERS, FILLER = "0123456789", "abcd", "!?@$", "KLMNOPQRST"
HIDDEN, FFN, HEAD_DIM = 64, 64, 16
MARKER_HEAD = (1, 2)


def planted_model(seed=0, background=0.15, layers=4, hidden=HIDDEN, ffn=FFN, heads=4):
    """(model, tokenizer, planted units ``{capability: {kind: [unit]}}``)."""
    tok = char_tokenizer()
    head_dim = hidden // heads
    config = LlamaConfig(vocab_size=97, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=heads // 2, head_dim=head_dim,
                         max_position_embeddings=128, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    g = torch.Generator().manual_seed(seed)
    ids = tok.convert_tokens_to_ids
    neuron_layers = (min(1, layers - 1), min(2, layers - 1))
    head_layer, head = min(MARKER_HEAD[0], layers - 1), MARKER_HEAD[1]
    with torch.no_grad():
        emb = torch.randn(97, hidden, generator=g)
        q, _ = torch.linalg.qr(emb[ids(list(MARKERS))].T)  # the markers' span
        others = [i for i in range(97) if i not in ids(list(MARKERS))]
        emb[others] -= emb[others] @ q @ q.T
        model.model.embed_tokens.weight.copy_(emb)
        unemb = torch.randn(97, hidden, generator=g)
        model.lm_head.weight.copy_(unemb)
        for layer in model.model.layers:
            for lin in (*[getattr(layer.self_attn, f"{p}_proj") for p in "qkvo"],
                        layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj):
                lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * background / hidden**0.5)
        e_hat = emb / emb.norm(dim=1, keepdim=True)
        u_hat = unemb / unemb.norm(dim=1, keepdim=True)
        rng = random.Random(seed)
        neurons = []
        for k, digit in enumerate(DIGITS):
            layer = neuron_layers[k % 2]
            n = rng.choice([i for i in range(ffn) if (layer, i) not in neurons])
            neurons.append((layer, n))
            mlp = model.model.layers[layer].mlp
            src, dst = ids(digit), ids(DIGITS[(k + 3) % 10])
            mlp.gate_proj.weight[n] = e_hat[src]
            mlp.up_proj.weight[n] = e_hat[src]
            mlp.down_proj.weight[:, n] = 3.0 / HIDDEN * (hidden / HIDDEN) ** 0.5 * u_hat[dst]
        attn = model.model.layers[head_layer].self_attn
        kv = head // 2
        attn.q_proj.weight[head * head_dim:(head + 1) * head_dim] = 0  # uniform attention over the prefix
        for j, marker in enumerate(MARKERS):
            attn.v_proj.weight[kv * head_dim + j] = e_hat[ids(marker)]
            attn.o_proj.weight[:, head * head_dim + j] = 2.5 * (hidden / HIDDEN) ** 0.5 * u_hat[ids(LETTERS[j])]
    planted = {"digits": {"neuron": neurons, "head": []}, "markers": {"neuron": [], "head": [(head_layer, head)]}}
    return model, tok, planted


def write_data(folder, n=40, seed=0):
    """digits.jsonl, markers.jsonl (exact match) and general.txt (random letters) in ``folder``."""
    rng = random.Random(seed)
    digits, markers = [], []
    for _ in range(n):
        d = rng.choice(DIGITS)
        prefix = "".join(rng.choice(FILLER) for _ in range(rng.randint(2, 5)))
        digits.append({"prompt": prefix + d, "answer": DIGITS[(DIGITS.index(d) + 3) % 10]})
        j = rng.randrange(len(MARKERS))
        before = "".join(rng.choice(FILLER) for _ in range(rng.randint(1, 3)))
        after = "".join(rng.choice(FILLER) for _ in range(rng.randint(1, 3)))
        markers.append({"prompt": before + MARKERS[j] + after, "answer": LETTERS[j]})
    general = "\n".join("".join(rng.choice(string.ascii_letters) for _ in range(60)) for _ in range(n))
    (folder / "digits.jsonl").write_text("".join(json.dumps(x) + "\n" for x in digits))
    (folder / "markers.jsonl").write_text("".join(json.dumps(x) + "\n" for x in markers))
    (folder / "general.txt").write_text(general)
    return folder

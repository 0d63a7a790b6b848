"""Tiny specialist teachers, trained here on the bundled data and saved as ordinary Hugging Face checkpoints.

Four specialists with different architectures and tokenizers give NEXUS real, disagreeing teachers to consolidate:

| name       | family                                          | tokenizer                   | data                      |
|------------|-------------------------------------------------|-----------------------------|---------------------------|
| arithmetic | Llama (`LlamaForCausalLM`), 6 layers            | characters (printable ASCII) | `arithmetic_items`, seeded |
| code       | Gemma 3 (`Gemma3ForCausalLM`), local/global layers | byte-level BPE, 1024, on code | `corpus_text("code", "train")` |
| prose      | Qwen 3 (`Qwen3ForCausalLM`)                     | byte-level BPE, 768, on prose | `corpus_text("prose", "train")` |
| reversal   | Qwen 2 (`Qwen2ForCausalLM`), 4 layers           | characters (digits, ``~``, ``=``) | `reversal_items`, seeded |

`train_specialist(name, out_dir)` trains one (fp32 on the CPU: see `SpecialistRecipe.autocast`), measures its
competence (`specialist_competence.py`) and writes the folder atomically:
``model.safetensors``, ``config.json``, ``generation_config.json``, the tokenizer, ``recipe.json`` (the recipe and
its hash), ``train_log.json`` (loss curve, tokens/s, wall time) and ``competence.json``. A folder that already holds
a finished model for the same recipe hash is returned as it is, without training.

Recipes are typed configs in a registry (`SPECIALISTS`, `register_specialist`); a variant for a test is
``SpecialistRecipe(**{**SPECIALISTS["code"].model_dump(), ...})``, passed to `train_specialist` in place of a name.
"""

import hashlib
import json
import math
import os
import time
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from nexus.conversion.atomic_output import atomic_dir
from nexus.conversion.corpora import GENERATED_ITEMS, corpus_text

# Bump when the training code changes in a way that changes the weights a recipe produces (invalidates caches).
TRAINING_CODE_VERSION = 1
FINISHED_MARKER = "competence.json"  # written last, inside the temporary folder; its presence means "finished"


class SpecialistRecipe(BaseModel):
    """Everything that determines a trained specialist; its hash is the cache key."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="specialist name: the capability it is good at and the folder it is saved in")
    family: Literal["llama", "gemma3_text", "qwen3", "qwen2"] = Field(description="HF architecture family of the model")
    tokenizer: Literal["char", "bpe"] = Field(description="character-level, or byte-level BPE trained on the data")
    char_alphabet: str | None = Field(None, min_length=1, description="char tokenizer: its characters (None: printable "
                                                                      "ASCII)")
    data: Literal["arithmetic", "reversal", "code", "prose"] = Field(
        description="training data: generated items (arithmetic, reversal: `GENERATED_ITEMS`), or a bundled corpus "
                    "(its train split); the item fields below apply to both generated sets")
    bpe_vocab_size: int = Field(1024, ge=260, description="BPE vocabulary size, specials and 256 bytes included")
    hidden_size: int = Field(ge=8, description="model width")
    num_layers: int = Field(ge=1, description="decoder layers")
    num_heads: int = Field(ge=1, description="attention (query) heads")
    num_kv_heads: int = Field(ge=1, description="key/value heads (grouped-query attention when < num_heads)")
    head_dim: int = Field(ge=4, description="width of one attention head")
    intermediate_size: int = Field(ge=8, description="FFN width")
    sliding_window: int | None = Field(None, ge=2, description="gemma3_text: window of the sliding-attention layers")
    full_attention_every: int = Field(
        2, ge=1, description="gemma3_text: every n-th layer attends globally, the others use the sliding window")
    steps: int = Field(ge=1, description="optimizer steps")
    lr: float = Field(gt=0, description="peak learning rate (AdamW; linear warm-up, cosine decay to 10%)")
    warmup_steps: int = Field(100, ge=0, description="linear warm-up steps")
    weight_decay: float = Field(0.1, ge=0, description="AdamW weight decay on matrices (not norms or embeddings)")
    batch_size: int = Field(ge=1, description="sequences per step")
    seq_len: int = Field(ge=4, description="tokens per training window (BOS included); also max_position_embeddings")
    train_items: int = Field(200_000, ge=1, description="arithmetic: distinct training items generated")
    train_seed: int = Field(1_000, description="arithmetic: items are generated from seeds train_seed, +1, ...")
    eval_items: int = Field(200, ge=1, description="arithmetic: held-out items for exact match")
    eval_seed: int = Field(0, description="arithmetic: seed of the held-out items (its prompts are never trained on)")
    stop_exact_match: float | None = Field(
        None, gt=0, le=1, description="arithmetic: stop training once exact match on the *validation* items (not the "
                                      "held-out ones competence is reported on) reaches this; `steps` is then a cap")
    validation_seed: int = Field(1, description="arithmetic: seed of the validation items used for early stopping")
    validation_items: int = Field(200, ge=1, description="arithmetic: validation items for early stopping")
    validate_every: int = Field(250, ge=1, description="arithmetic: steps between validation checks")
    decay: Literal["matrices", "all"] = Field(
        "matrices", description="weight decay on matrices only (not norms or embeddings), or on every parameter; "
                                "decay on everything is what makes the arithmetic specialist 'grok' modular digit sums")
    schedule: Literal["cosine", "constant"] = Field(
        "cosine", description="learning rate after warm-up: cosine decay to 10%, or constant")
    clip_grad_norm: float | None = Field(1.0, gt=0, description="gradient-norm clipping (None: no clipping)")
    adam_beta2: float = Field(0.98, gt=0, lt=1, description="AdamW beta2")
    autocast: Literal["none", "bfloat16"] = Field(
        "none", description="bf16 autocast for training; 'none' (fp32) because this CPU has no native bf16 matmul "
                            "(AVX2 only: a bf16 matmul measured ~48x slower than fp32)")

    @model_validator(mode="after")
    def _check(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if self.family == "gemma3_text" and self.sliding_window is None:
            raise ValueError("sliding_window: a gemma3_text specialist needs one (its layers alternate local/global)")
        if self.data in GENERATED_ITEMS:
            for field in ("eval_seed", "validation_seed"):
                if self.train_seed <= getattr(self, field) < self.train_seed + self._seed_count():
                    raise ValueError(f"{field} {getattr(self, field)} falls inside the training seed range "
                                     f"{self.train_seed}..{self.train_seed + self._seed_count() - 1}")
            if self.stop_exact_match is not None and self.validation_seed == self.eval_seed:
                raise ValueError("validation_seed: early stopping must not look at the held-out (eval_seed) items")
        return self

    def _seed_count(self):
        return math.ceil(self.train_items / ARITHMETIC_ITEMS_PER_SEED)

    def recipe_hash(self):
        recipe = self.model_dump()
        for name in HASH_STABLE_FIELDS:  # fields added later leave the hash of recipes that keep their default alone
            if recipe[name] == SpecialistRecipe.model_fields[name].default:
                del recipe[name]
        blob = json.dumps({"recipe": recipe, "code": TRAINING_CODE_VERSION}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


ARITHMETIC_ITEMS_PER_SEED = 10_000
HASH_STABLE_FIELDS = ("decay", "schedule", "clip_grad_norm", "adam_beta2", "char_alphabet")

SPECIALISTS: dict[str, SpecialistRecipe] = {}


def register_specialist(recipe: SpecialistRecipe) -> SpecialistRecipe:
    """Add ``recipe`` under its name; a taken name is an error, never a silent override."""
    if recipe.name in SPECIALISTS:
        raise ValueError(f"specialist {recipe.name!r} is already registered")
    SPECIALISTS[recipe.name] = recipe
    return recipe


# Arithmetic (little-endian layout, see `arithmetic_items`) is learned in a sudden jump ("grokking") once weight decay
# acts on every parameter: measured with 64-item batches, lr 2e-3 constant, decay 0.1 on all parameters, the 6-layer
# width-96 model went from chance on the low digits to 100% digit accuracy between steps 1,250 and 1,500; with decay on
# matrices only, clipping and a cosine schedule it was still at 0-2% exact match after 2,000-4,000 steps. Training
# stops once 95% of the validation items are right; `steps` is a cap.
register_specialist(SpecialistRecipe(
    name="arithmetic", family="llama", tokenizer="char", data="arithmetic",
    hidden_size=96, num_layers=6, num_heads=4, num_kv_heads=4, head_dim=24, intermediate_size=384,
    steps=4000, lr=2e-3, warmup_steps=0, weight_decay=0.1, decay="all", schedule="constant", clip_grad_norm=None,
    adam_beta2=0.999, batch_size=64, seq_len=32, stop_exact_match=0.95, validate_every=250,
))
register_specialist(SpecialistRecipe(
    name="code", family="gemma3_text", tokenizer="bpe", bpe_vocab_size=1024, data="code",
    hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=32, intermediate_size=512,
    sliding_window=64, full_attention_every=2,
    steps=600, lr=2e-3, batch_size=16, seq_len=128,
))
register_specialist(SpecialistRecipe(
    name="prose", family="qwen3", tokenizer="bpe", bpe_vocab_size=768, data="prose",
    hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=32, intermediate_size=512,
    steps=600, lr=2e-3, batch_size=16, seq_len=128,
))

# String reversal of 5-8-digit strings (``~48213=`` -> ``31284``), a task neither Gemma-3-270M nor the arithmetic
# specialist can do (issue 19's added teacher): another family (Qwen 2: q/k/v biases) and another tokenizer (a
# character one over the 12 characters the task uses, so its ids differ from the arithmetic specialist's).
register_specialist(SpecialistRecipe(
    name="reversal", family="qwen2", tokenizer="char", char_alphabet="0123456789~=", data="reversal",
    hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=4, head_dim=16, intermediate_size=256,
    steps=3000, lr=2e-3, warmup_steps=50, weight_decay=0.1, schedule="constant", adam_beta2=0.99,
    batch_size=64, seq_len=24, train_items=100_000, stop_exact_match=0.95, validate_every=100,
))


def specialist_recipe(name_or_recipe) -> SpecialistRecipe:
    if isinstance(name_or_recipe, SpecialistRecipe):
        return name_or_recipe
    if name_or_recipe not in SPECIALISTS:
        raise ValueError(f"unknown specialist {name_or_recipe!r}; registered: {', '.join(sorted(SPECIALISTS))}")
    return SPECIALISTS[name_or_recipe]


# ---------------------------------------------------------------------------------------------------- tokenizer


def build_tokenizer(recipe: SpecialistRecipe):
    """The recipe's tokenizer; a BPE is trained on the train split of the recipe's corpus."""
    if recipe.tokenizer == "char":
        from nexus.training.char_tokenizer import PRINTABLE_ASCII, build_char_tokenizer

        return build_char_tokenizer(recipe.char_alphabet or PRINTABLE_ASCII, model_max_length=recipe.seq_len)
    from nexus.training.bpe_tokenizer import train_bpe_tokenizer

    if recipe.data in GENERATED_ITEMS:
        text = "\n".join(i["prompt"] + i["answer"] for i in GENERATED_ITEMS[recipe.data](20_000, recipe.train_seed))
    else:
        text = corpus_text(recipe.data, "train")
    return train_bpe_tokenizer(text, recipe.bpe_vocab_size, model_max_length=recipe.seq_len)


# -------------------------------------------------------------------------------------------------------- model


def build_model(recipe: SpecialistRecipe, tokenizer, seed=0):
    """A freshly initialised HF causal LM of the recipe's family, sized to the tokenizer."""
    torch.manual_seed(seed)
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=recipe.hidden_size,
        intermediate_size=recipe.intermediate_size,
        num_hidden_layers=recipe.num_layers,
        num_attention_heads=recipe.num_heads,
        num_key_value_heads=recipe.num_kv_heads,
        head_dim=recipe.head_dim,
        max_position_embeddings=recipe.seq_len,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )
    if recipe.family == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(**common, rope_parameters={"rope_type": "default", "rope_theta": 10_000.0})
        model = LlamaForCausalLM(config)
    elif recipe.family == "qwen3":
        from transformers import Qwen3Config, Qwen3ForCausalLM

        config = Qwen3Config(**common, rope_parameters={"rope_type": "default", "rope_theta": 10_000.0})
        model = Qwen3ForCausalLM(config)
    elif recipe.family == "qwen2":
        from transformers import Qwen2Config, Qwen2ForCausalLM

        config = Qwen2Config(**common, rope_parameters={"rope_type": "default", "rope_theta": 10_000.0})
        model = Qwen2ForCausalLM(config)
    elif recipe.family == "gemma3_text":
        from transformers import Gemma3ForCausalLM, Gemma3TextConfig

        every = recipe.full_attention_every
        layer_types = ["full_attention" if (i + 1) % every == 0 else "sliding_attention"
                       for i in range(recipe.num_layers)]
        config = Gemma3TextConfig(
            **common, query_pre_attn_scalar=recipe.head_dim, sliding_window=recipe.sliding_window,
            layer_types=layer_types,
            rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                             "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}},
        )
        model = Gemma3ForCausalLM(config)
    else:  # unreachable: the recipe's Literal type guards it
        raise ValueError(f"family: unknown {recipe.family!r}")
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


# --------------------------------------------------------------------------------------------------------- data


class ArithmeticBatches:
    """Generated items (arithmetic or reversal, ``recipe.data``) as ``BOS prompt answer EOS`` rows, right-padded; the
    loss covers only the answer and EOS (the prompt is random).

    Items whose prompt is also a held-out or validation prompt are dropped, so exact match is measured on unseen
    problems.
    """

    def __init__(self, recipe, tokenizer, seed):
        generate = GENERATED_ITEMS[recipe.data]
        held_out = {i["prompt"] for i in generate(recipe.eval_items, recipe.eval_seed)}
        held_out |= {i["prompt"] for i in generate(recipe.validation_items, recipe.validation_seed)}
        items = []
        for k in range(recipe._seed_count()):
            n = min(ARITHMETIC_ITEMS_PER_SEED, recipe.train_items - k * ARITHMETIC_ITEMS_PER_SEED)
            items += [i for i in generate(n, recipe.train_seed + k) if i["prompt"] not in held_out]
        prompts = tokenizer([i["prompt"] for i in items])["input_ids"]  # BOS + prompt
        answers = tokenizer([i["answer"] for i in items], add_special_tokens=False)["input_ids"]
        width = max(len(p) + len(a) + 1 for p, a in zip(prompts, answers))
        if width > recipe.seq_len:
            raise ValueError(f"seq_len: {recipe.seq_len} is shorter than the longest {recipe.data} item "
                             f"({width} tokens)")
        self.ids = torch.full((len(items), width), tokenizer.pad_token_id, dtype=torch.long)
        self.loss_mask = torch.zeros((len(items), width), dtype=torch.bool)  # True where the token is a target
        for row, (p, a) in enumerate(zip(prompts, answers)):
            seq = p + a + [tokenizer.eos_token_id]
            self.ids[row, : len(seq)] = torch.tensor(seq)
            self.loss_mask[row, len(p): len(seq)] = True
        self.batch_size = recipe.batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.description = f"{len(items)} {recipe.data} items from seeds {recipe.train_seed}.."

    def __call__(self):
        idx = torch.randint(0, self.ids.shape[0], (self.batch_size,), generator=self.generator)
        ids, mask = self.ids[idx], self.loss_mask[idx]
        width = int(mask.any(0).nonzero().max()) + 1  # drop all-padding columns
        ids, mask = ids[:, :width], mask[:, :width]
        return ids, ids.masked_fill(~mask, -100)  # right padding after EOS: causal attention never sees it


class CorpusBatches:
    """Random windows ``BOS + seq_len-1 tokens`` of the tokenised train split; every position is a target."""

    def __init__(self, recipe, tokenizer, seed):
        text = corpus_text(recipe.data, "train")
        self.stream = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
        if len(self.stream) < recipe.seq_len:
            raise ValueError(f"seq_len: {recipe.seq_len} is longer than the whole {recipe.data} corpus")
        self.bos = tokenizer.bos_token_id
        self.batch_size, self.span = recipe.batch_size, recipe.seq_len - 1
        self.generator = torch.Generator().manual_seed(seed)
        self.description = f"{len(self.stream)} tokens of {recipe.data} (train split)"

    def __call__(self):
        starts = torch.randint(0, len(self.stream) - self.span + 1, (self.batch_size,), generator=self.generator)
        body = torch.stack([self.stream[s: s + self.span] for s in starts.tolist()])  # (B, T-1)
        ids = torch.cat([torch.full((self.batch_size, 1), self.bos, dtype=torch.long), body], 1)  # (B, T)
        return ids, ids.clone()


def make_batches(recipe, tokenizer, seed):
    return (ArithmeticBatches if recipe.data in GENERATED_ITEMS else CorpusBatches)(recipe, tokenizer, seed)


# ----------------------------------------------------------------------------------------------------- training


def _lr_lambda(recipe):
    def factor(step):  # linear warm-up, then cosine from 1 to 0.1
        warm = min(1.0, (step + 1) / recipe.warmup_steps) if recipe.warmup_steps else 1.0
        if recipe.schedule == "constant":
            return warm
        progress = min(1.0, step / max(1, recipe.steps))
        return warm * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))

    return factor


def _optimizer(model, recipe):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if recipe.decay == "all" or (p.ndim >= 2 and "embed" not in name) else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=recipe.lr, betas=(0.9, recipe.adam_beta2),
                             eps=1e-8)


def train_model(model, recipe, batches, progress=True, log_every=50, validate=None):
    """Train ``model`` in place for ``recipe.steps`` steps; returns the training log (losses, tokens/s, wall time).

    ``validate(model) -> score``, when given, runs every ``recipe.validate_every`` steps; training stops as soon as
    the score reaches ``recipe.stop_exact_match``. Validation time is excluded from tokens/s but not from wall time.
    """
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    optimizer = _optimizer(model, recipe)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(recipe))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=recipe.autocast == "bfloat16")
    losses, tokens, first_loss, validations, validation_seconds, stopped_at = [], 0, None, [], 0.0, None
    model.train()
    from ..conversion.progress_bar import progress_with_columns

    bar = progress_with_columns(TextColumn(f"training {recipe.name}"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("loss {task.fields[loss]:.3f}  {task.fields[tps]:.0f} tok/s"),
                                TimeElapsedColumn(), TimeRemainingColumn(), enabled=bool(progress))
    start, cpu_start = time.perf_counter(), time.process_time()
    with bar:
        task = bar.add_task("train", total=recipe.steps, loss=float("nan"), tps=0.0)
        for step in range(recipe.steps):
            ids, labels = batches()
            with autocast:
                logits = model(input_ids=ids, use_cache=False).logits  # (B, T, V)
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"training {recipe.name}: the loss became {loss.item()} at step {step}")
            loss.backward()
            if recipe.clip_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.clip_grad_norm)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            tokens += ids.numel()
            value = loss.item()
            first_loss = value if first_loss is None else first_loss
            if step % log_every == 0 or step == recipe.steps - 1:
                losses.append([step, value])
                bar.update(task, loss=value, tps=tokens / (time.perf_counter() - start))
            bar.advance(task)
            if validate is not None and ((step + 1) % recipe.validate_every == 0 or step == recipe.steps - 1):
                began = time.perf_counter()
                score = validate(model)
                model.train()
                validation_seconds += time.perf_counter() - began
                validations.append({"step": step + 1, "score": score, "seconds": time.perf_counter() - start})
                if progress:
                    bar.console.print(f"  step {step + 1}: validation exact match {score:.3f}")
                if recipe.stop_exact_match is not None and score >= recipe.stop_exact_match:
                    stopped_at = step + 1
                    if losses[-1][0] != step:
                        losses.append([step, value])
                    break
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    model.eval()
    return {"steps": stopped_at or recipe.steps, "max_steps": recipe.steps, "stopped_early": stopped_at is not None,
            "tokens": tokens, "wall_seconds": wall, "validation_seconds": validation_seconds,
            "tokens_per_second": tokens / (wall - validation_seconds), "validations": validations,
            "cpu_seconds": cpu,  # all threads; cpu/wall below the thread count means the cores were shared
            "first_loss": first_loss, "final_loss": losses[-1][1], "losses": losses,
            "threads": torch.get_num_threads(), "autocast": recipe.autocast}


# -------------------------------------------------------------------------------------------------- the folder


def _finished_hash(folder):
    """The recipe hash of a finished specialist folder, or None when ``folder`` is not one."""
    folder = Path(folder)
    try:
        if not (folder / FINISHED_MARKER).is_file():
            return None
        return json.loads((folder / "recipe.json").read_text())["hash"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def train_specialist(name, out_dir, steps=None, seed=0, progress=True):
    """Train the specialist ``name`` (a registered name or a `SpecialistRecipe`) into ``out_dir``; returns the path.

    ``steps`` overrides the recipe's step count (it is part of the cache key). If ``out_dir`` already holds a finished
    model of the same recipe and seed, it is returned without training. A folder holding a *different* specialist
    is replaced; any other existing ``out_dir`` is refused, so nothing that is not ours is deleted.
    """
    from rich.console import Console

    from nexus.training.specialist_competence import (
        measure_competence,
        print_competence,
    )

    recipe = specialist_recipe(name)
    if steps is not None:
        recipe = recipe.model_copy(update={"steps": int(steps)})
        recipe = SpecialistRecipe.model_validate(recipe.model_dump())  # re-validate the override
    out_dir = Path(out_dir)
    key = hashlib.sha256(f"{recipe.recipe_hash()}:{seed}".encode()).hexdigest()[:16]
    found = _finished_hash(out_dir)
    console = Console(quiet=not progress)
    if found == key:
        console.print(f"[green]specialist {recipe.name}[/]: cached in {out_dir} (recipe {key})")
        return out_dir
    if out_dir.exists() and found is None and (out_dir.is_file() or any(out_dir.iterdir())):
        raise FileExistsError(f"out_dir {out_dir} exists and is not a finished specialist folder; "
                              "remove it or choose another path")
    with atomic_dir(out_dir, overwrite=True) as tmp:
        tokenizer = build_tokenizer(recipe)
        model = build_model(recipe, tokenizer, seed)
        params = sum(p.numel() for p in model.parameters())
        batches = make_batches(recipe, tokenizer, seed)
        console.print(f"[bold]specialist {recipe.name}[/]: {recipe.family}, {recipe.tokenizer} tokenizer "
                      f"({len(tokenizer)} tokens), {params / 1e6:.2f}M params, {batches.description}")
        validate = None
        if recipe.data in GENERATED_ITEMS and recipe.stop_exact_match is not None:
            from nexus.training.specialist_competence import exact_match_validator

            validate = exact_match_validator(tokenizer, recipe, work_dir=tmp)
        log = train_model(model, recipe, batches, progress=progress, validate=validate)
        log["params"] = params
        console.print(f"  trained {log['steps']} steps, {log['tokens']} tokens in {log['wall_seconds']:.1f} s "
                      f"({log['tokens_per_second']:.0f} tok/s, {log['threads']} threads, "
                      f"{log['cpu_seconds'] / log['wall_seconds']:.2f} CPU-s per s); "
                      f"loss {log['first_loss']:.3f} -> {log['final_loss']:.3f}")
        model.save_pretrained(tmp)  # safetensors
        tokenizer.save_pretrained(tmp)
        (tmp / "recipe.json").write_text(json.dumps(
            {"hash": key, "seed": seed, "recipe": recipe.model_dump(), "code_version": TRAINING_CODE_VERSION},
            indent=2))
        (tmp / "train_log.json").write_text(json.dumps(log, indent=2))
        started = time.perf_counter()
        competence = measure_competence(model, tokenizer, recipe, work_dir=tmp)
        competence["eval_seconds"] = time.perf_counter() - started
        competence["train_seconds"] = log["wall_seconds"]
        competence["train_tokens_per_second"] = log["tokens_per_second"]
        competence["params"] = params
        print_competence(recipe.name, competence, console)
        (tmp / FINISHED_MARKER).write_text(json.dumps(competence, indent=2))
        _readable(tmp)
    return out_dir


def _readable(folder):
    """The temporary folder is created private (0700); a finished cache folder is readable like any checkpoint."""
    os.chmod(folder, 0o755)
    for path in folder.iterdir():
        os.chmod(path, 0o644)


def load_competence(folder):
    """The competence dict written next to a finished specialist's weights."""
    path = Path(folder) / FINISHED_MARKER
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not a finished specialist folder (no {FINISHED_MARKER})")
    return json.loads(path.read_text())

"""OT merging: on a pair where B is an exact unit permutation of A, OT recovers the permutation and the merge is A."""

import pytest
import torch
from conftest import tiny_teacher

from nexus.conversion.ot_merge import MergeError, average_models, match_units, ot_merge, permute_model
from nexus.conversion.teacher_import import nexus_from_teacher


def _windows(seed=0):
    return torch.randint(6, 97, (8, 24), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_ot_recovers_a_planted_permutation_and_the_merge_is_the_original(family):
    a = nexus_from_teacher(tiny_teacher(family))
    g = torch.Generator().manual_seed(1)
    neuron_perms = {l: torch.randperm(48, generator=g).tolist() for l in range(3)}
    # 4 heads in 2 kv groups: swap the groups in layer 0, swap heads inside group 1 in layer 2
    head_perms = {0: ([2, 3, 0, 1], [1, 0]), 2: ([0, 1, 3, 2], [0, 1])}
    b = permute_model(a, neuron_perms, head_perms)
    ids = _windows()
    with torch.no_grad():  # a permutation does not change the function ...
        assert (a(ids).logits - b(ids).logits).abs().max() < 1e-4
    assert (a.model.towers[0].layers[1].mlp.down_proj.weight - b.model.towers[0].layers[1].mlp.down_proj.weight
            ).abs().max() > 1e-3  # ... but it does change the weights, so naive averaging mixes unrelated units
    naive = average_models(a, b)
    merged, report = ot_merge(a, b, ids, autocast=False)
    for l in range(3):  # B's unit perm[i] must land in A's slot i: the inverse of the planted permutation
        inverse = torch.argsort(torch.as_tensor(neuron_perms[l])).tolist()
        assert report["neuron_permutations"][l] == inverse
    assert report["head_permutations"][0] == [2, 3, 0, 1] and report["head_permutations"][2] == [0, 1, 3, 2]
    assert report["head_permutations"][1] == [0, 1, 2, 3]
    for name, tensor in a.state_dict().items():
        assert torch.allclose(merged.state_dict()[name], tensor, atol=1e-6), name
    with torch.no_grad():
        assert (merged(ids).logits - a(ids).logits).abs().max() < 1e-4
        assert (naive(ids).logits - a(ids).logits).abs().max() > 1e-2


def test_match_units_rejects_a_non_square_cost_and_merge_rejects_other_architectures():
    with pytest.raises(MergeError, match="square"):
        match_units(torch.zeros(3, 4).numpy())
    a = nexus_from_teacher(tiny_teacher("llama"))
    b = nexus_from_teacher(tiny_teacher("qwen3"))
    with pytest.raises(MergeError, match="architecture"):
        average_models(a, b)

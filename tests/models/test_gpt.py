import torch

from prefix.config import ModelConfig
from prefix.models.composer_model import ComposerGPT
from prefix.models.gpt import GPT

CFG = ModelConfig(vocab_size=257, max_seq_len=16, d_model=32, n_heads=2, n_layers=2, dropout=0.1)


def test_forward_shapes_and_causality() -> None:
    torch.manual_seed(0)
    model = GPT(CFG).eval()
    idx = torch.randint(0, 257, (2, 16))
    logits = model(idx)
    assert logits.shape == (2, 16, 257)
    changed = idx.clone()
    changed[:, -1] = (changed[:, -1] + 1) % 257
    assert torch.allclose(model(changed)[:, :-1], logits[:, :-1]), 'a later token must not affect earlier positions'


def test_loss_falls_on_a_repeated_batch() -> None:
    torch.manual_seed(0)
    model = ComposerGPT(CFG)
    batch = {'input_ids': torch.randint(0, 257, (4, 17))}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    first = model.loss(model(batch), batch).item()
    for _ in range(30):
        opt.zero_grad()
        model.loss(model(batch), batch).backward()
        opt.step()
    assert model.loss(model(batch), batch).item() < first / 2


def test_eval_metrics() -> None:
    model = ComposerGPT(CFG).eval()
    batch = {'input_ids': torch.randint(0, 257, (4, 17))}
    out = model.eval_forward(batch)
    for metric in model.get_metrics(is_train=False).values():
        model.update_metric(batch, out, metric)
        assert torch.isfinite(metric.compute())


def test_initial_weights_depend_on_the_seed_and_each_name_alone() -> None:
    a, b = GPT(CFG, seed=3), GPT(CFG, seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    assert not torch.equal(GPT(CFG, seed=4).tok_emb.weight, a.tok_emb.weight)
    assert a.head.weight is a.tok_emb.weight, 'tied'
    with torch.device('meta'):
        meta = GPT(CFG, seed=3)
    assert all(p.is_meta for p in meta.parameters()), 'nothing allocated: FSDP materializes the shards'
    meta.to_empty(device='cpu')
    for module in reversed(list(meta.modules())):  # any order gives the same values
        meta.param_init_fn(module)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), meta.state_dict().values(), strict=True))


def test_rows_of_a_weight_are_drawn_alone_and_equal_those_rows_of_the_whole(monkeypatch) -> None:
    """What a rank of FSDP draws for its shard: only the chunks its rows overlap, the same values as the whole."""
    import prefix.models.gpt as model_module

    monkeypatch.setattr(model_module, 'CHUNK', 7)  # chunk boundaries inside rows, across rows, at the end
    linear = torch.nn.Linear(5, 9)
    whole = model_module.initial_value(linear, 'weight', (9, 5), seed=11)
    assert whole.shape == (9, 5) and whole.std() > 0
    for rows in ((0, 9), (0, 3), (3, 6), (6, 9), (4, 5), (5, 5)):
        assert torch.equal(model_module.initial_value(linear, 'weight', (9, 5), seed=11, rows=rows), whole[rows[0]:rows[1]])
    assert torch.equal(model_module.initial_value(linear, 'bias', (9,), seed=11, rows=(2, 4)), torch.zeros(2))


def test_a_resumed_model_draws_no_initial_weights(monkeypatch) -> None:
    """A resume loads every weight: drawing them first would cost minutes per rank at the sizes users train."""
    import prefix.models.gpt as model_module

    def refuse(*args, **kwargs):
        raise AssertionError('an initial value was drawn')

    monkeypatch.setattr(model_module, 'initial_value', refuse)
    model = ComposerGPT(CFG, seed=3, initialize=False)
    assert not any(p.is_meta for p in model.parameters()) and model.model.head.weight is model.model.tok_emb.weight
    with torch.device('meta'):
        sharded = GPT(CFG, seed=3, initialize=False)
    sharded.to_empty(device='cpu')
    for module in sharded.modules():
        sharded.param_init_fn(module)  # what FSDP calls for each module: nothing to do

import torch

from prefix.composer_model import ComposerGPT
from prefix.model import GPT, ModelConfig

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

"""HostSnapshot: a copy training cannot change, shared storage kept shared, buffers reused."""

import io

import torch

from prefix.snapshot import HostSnapshot


def test_the_copy_is_independent_of_the_live_tensors_and_keeps_the_structure() -> None:
    live = {'model': {'w': torch.ones(3)}, 'opt': [torch.zeros(2), 7], 'step': (1, 'x')}
    snap = HostSnapshot().copy(live)
    live['model']['w'].add_(1)
    live['opt'][0].add_(1)
    assert torch.equal(snap['model']['w'], torch.ones(3)) and torch.equal(snap['opt'][0], torch.zeros(2))
    assert snap['opt'][1] == 7 and snap['step'] == (1, 'x')


def test_tied_weights_stay_one_tensor_so_the_file_stores_them_once() -> None:
    weight = torch.randn(64, 64)
    snap = HostSnapshot().copy({'emb': weight.detach(), 'head': weight.detach()})
    assert snap['emb'] is snap['head']
    buffer = io.BytesIO()
    torch.save(snap, buffer)
    assert buffer.tell() < 2 * weight.numel() * 4


def test_buffers_are_reused_from_one_checkpoint_to_the_next() -> None:
    snapshot = HostSnapshot()
    first = snapshot.copy({'w': torch.ones(4)})['w']
    second = snapshot.copy({'w': torch.full((4,), 2.0)})['w']
    assert second.data_ptr() == first.data_ptr() and torch.equal(second, torch.full((4,), 2.0))
    assert snapshot.nbytes == 16


def test_a_shard_is_copied_as_this_ranks_part_of_the_whole(tmp_path) -> None:
    """FSDP's DTensors: the copy holds this rank's shard, and where it sits in the whole tensor."""
    import torch.distributed as tdist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    tdist.init_process_group('gloo', init_method=f'file://{tmp_path}/store', rank=0, world_size=1)
    try:
        whole = torch.arange(12.0).reshape(4, 3)
        live = distribute_tensor(whole, init_device_mesh('cpu', (1,)), [Shard(0)])
        snap = HostSnapshot().copy({'w': live})['w']
        live.to_local().add_(1)
        assert isinstance(snap, DTensor) and snap.placements == live.placements and snap.shape == live.shape
        assert torch.equal(snap.full_tensor(), whole)
    finally:
        tdist.destroy_process_group()

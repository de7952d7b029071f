"""HostSnapshot: a copy training cannot change, shared storage kept shared, buffers reused."""

import io

import pytest
import torch

from prefix.checkpoint.snapshot import HostSnapshot


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


@pytest.fixture
def one_rank(tmp_path):
    import torch.distributed as tdist

    tdist.init_process_group('gloo', init_method=f'file://{tmp_path}/store', rank=0, world_size=1)
    yield
    tdist.destroy_process_group()


def test_a_shard_is_copied_as_this_ranks_part_of_the_whole(one_rank) -> None:
    """FSDP's DTensors: the copy holds this rank's shard, and where it sits in the whole tensor."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    whole = torch.arange(12.0).reshape(4, 3)
    live = distribute_tensor(whole, init_device_mesh('cpu', (1,)), [Shard(0)])
    snap = HostSnapshot().copy({'w': live})['w']
    live.to_local().add_(1)
    assert isinstance(snap, DTensor) and snap.placements == live.placements and snap.shape == live.shape
    assert torch.equal(snap.full_tensor(), whole)


def mixed_state() -> dict:
    """What users' models hold: bf16 and fp16 weights, int and bool buffers, an empty tensor, a strided view, tied weights."""
    tied = torch.randn(5, 3)
    return {'a': torch.ones(3, dtype=torch.float16), 'flag': torch.tensor(True), 'step': torch.tensor(7),
            'empty': torch.zeros(0, 5), 'w': torch.randn(10, 10)[:, ::2], 'bf16': torch.randn(4, 4).to(torch.bfloat16),
            'mask': torch.rand(6) > 0.5, 'count': torch.arange(5, dtype=torch.int32), 'emb': tied, 'head': tied}


def test_one_slab_holds_every_copy_at_its_exact_size_aligned() -> None:
    """One allocation per snapshot (pinned once on a GPU host), no per-tensor rounding up."""
    live = {'a': torch.ones(3, dtype=torch.float16), 'flag': torch.tensor(True), 'step': torch.tensor(7),
            'empty': torch.zeros(0, 5), 'w': torch.randn(10, 10)[:, ::2]}  # a strided view is copied dense
    snapshot = HostSnapshot()
    snap = snapshot.copy(live)
    start, length = snapshot.mapping
    assert length == snapshot.nbytes
    assert all(start <= t.data_ptr() and t.data_ptr() + t.nbytes <= start + length for t in snap.values() if t.numel())
    assert all(t.data_ptr() % 64 == 0 for t in snap.values() if t.numel())
    # 6 + 1 + 8 + 0 + 200 bytes, each copy starting at a multiple of 64: the last ends at 3 * 64 + 200
    assert snapshot.nbytes == 3 * 64 + 200
    assert all(torch.equal(snap[k], live[k]) for k in live)


@pytest.mark.parametrize('keep', [True, False])
def test_a_copy_of_mixed_dtypes_saves_and_loads_bit_exact_each_tensor_stored_once(keep: bool) -> None:
    """``torch.save`` refuses views of one storage as several dtypes: each copy has a storage of its own, exactly its bytes."""
    live = mixed_state()
    snap = HostSnapshot(keep=keep).copy(live)
    assert all(t.untyped_storage().nbytes() == t.nbytes for t in snap.values())
    buffer = io.BytesIO()
    torch.save(snap, buffer)
    assert buffer.tell() < sum(t.nbytes for k, t in live.items() if k != 'head') + 4096, 'no slab, no tied tensor, saved twice'
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    for key, value in live.items():
        assert loaded[key].dtype == value.dtype and torch.equal(loaded[key], value), key
    assert loaded['emb'] is loaded['head']


def test_a_forked_child_inherits_no_slab() -> None:
    """A DataLoader forks workers at each epoch: a page-locked slab would be copied into each at once."""
    import os

    snapshot = HostSnapshot()
    snapshot.copy({'w': torch.randn(1 << 18)})
    start, length = snapshot.mapping
    flags = vm_flags(f'/proc/{os.getpid()}/smaps', start)
    assert 'dc' in flags.split(), f'the slab is not marked do-not-copy on fork: {flags}'
    pid = os.fork()
    if pid == 0:  # the child: is anything mapped at the slab's address?
        os._exit(0 if vm_flags('/proc/self/smaps', start) == '' else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, 'the child process has the slab mapped'


def vm_flags(smaps: str, address: int) -> str:
    """The ``VmFlags`` of the mapping that contains ``address`` ('' where none does)."""
    inside = False
    for line in open(smaps).read().splitlines():
        head = line.split()[0]
        if '-' in head and not head.endswith(':'):
            low, high = (int(x, 16) for x in head.split('-'))
            inside = low <= address < high
        elif inside and head == 'VmFlags:':
            return line.split(':', 1)[1].strip()
    return ''


def test_a_changed_structure_gets_a_new_slab_and_one_off_copies_never_share() -> None:
    kept = HostSnapshot()
    first = kept.copy({'w': torch.ones(4)})['w']
    grown = kept.copy({'w': torch.ones(4), 'm': torch.ones(4)})['w']
    assert grown.data_ptr() != first.data_ptr() and torch.equal(first, torch.ones(4))
    one_off = HostSnapshot(keep=False)
    assert one_off.copy({'w': torch.ones(4)})['w'].data_ptr() != one_off.copy({'w': torch.ones(4)})['w'].data_ptr()


def test_a_writer_thread_is_handed_host_memory_only() -> None:
    from prefix.checkpoint.snapshot import host_only

    assert host_only({'w': [torch.ones(2)], 'n': 3}, 'state') is not None
    with pytest.raises(AssertionError, match=r'state/w/0: a meta tensor was handed to a writer thread'):
        host_only({'w': [torch.empty(2, device='meta')]}, 'state')


def test_a_shard_of_a_gpu_mesh_is_copied_into_host_memory_and_stays_there(one_rank) -> None:
    """FSDP's shards on a GPU host: the copy's DTensor keeps its host local tensor. ``DTensor.from_local``
    would move it to the mesh's device (on a machine without a GPU, it raises)."""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import DTensor, Shard
    from torch.distributed.tensor._dtensor_spec import DTensorSpec, TensorMeta

    gpu_mesh = DeviceMesh('cuda', [0], _init_backend=False)
    local = torch.arange(6.0).reshape(2, 3)
    spec = DTensorSpec(gpu_mesh, (Shard(0),), TensorMeta(local.shape, local.stride(), local.dtype))
    live = DTensor(local, spec, requires_grad=False)
    snapshot = HostSnapshot()
    snap = snapshot.copy({'w': live})['w']
    assert isinstance(snap, DTensor) and snap.device_mesh is gpu_mesh and snap.placements == live.placements
    assert snap.to_local().device.type == 'cpu' and torch.equal(snap.to_local(), local)
    assert snap.to_local().untyped_storage().nbytes() == snapshot.nbytes == local.numel() * 4, 'no second copy anywhere'


def test_a_checkpoint_read_into_host_memory_is_copied_into_the_live_shards(one_rank) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from prefix.checkpoint.snapshot import copy_into

    mesh = init_device_mesh('cpu', (1,))
    live = {'w': distribute_tensor(torch.zeros(4, 3), mesh, [Shard(0)]), 'opt': [torch.zeros(2), {'lr': 0.1}]}
    host = HostSnapshot().empty_like(live)
    host['w'].to_local().copy_(torch.arange(12.0).reshape(4, 3))  # what a read puts there
    host['opt'][0].fill_(5)
    host['opt'][1]['lr'] = 0.5
    loaded = copy_into(live, host)
    assert loaded['w'] is live['w'] and loaded['opt'][0] is live['opt'][0] and loaded['opt'][1] == {'lr': 0.5}
    assert torch.equal(live['w'].full_tensor(), torch.arange(12.0).reshape(4, 3))
    assert torch.equal(live['opt'][0], torch.full((2,), 5.0))

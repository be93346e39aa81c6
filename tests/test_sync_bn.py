"""CrossRankBatchNorm2d over 2 gloo ranks == BatchNorm2d over the whole batch (values and grads)."""
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from ssl_xcit.engine.sync_bn import CrossRankBatchNorm2d, convert_sync_batchnorm


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _reference(x, w_out):
    bn = nn.BatchNorm2d(3).double()
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.0, 2.0, 0.5]))
        bn.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    x = x.clone().requires_grad_(True)
    y = bn(x)
    (y * w_out).sum().backward()
    return y.detach(), x.grad, bn.weight.grad, bn.bias.grad, bn.running_mean, bn.running_var


def _worker(rank, port, x, w_out, out_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    bn = CrossRankBatchNorm2d(3).double()
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.0, 2.0, 0.5]))
        bn.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    sl = slice(0, 3) if rank == 0 else slice(3, 8)     # uneven shards on purpose
    xr = x[sl].clone().requires_grad_(True)
    y = bn(xr)
    (y * w_out[sl]).sum().backward()
    gw, gb = bn.weight.grad.clone(), bn.bias.grad.clone()
    dist.all_reduce(gw)
    dist.all_reduce(gb)
    torch.save({"y": y.detach(), "gx": xr.grad, "gw": gw, "gb": gb, "rm": bn.running_mean,
                "rv": bn.running_var}, f"{out_path}.{rank}")
    dist.destroy_process_group()


def test_two_ranks_match_one_batchnorm(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(8, 3, 4, 5, dtype=torch.float64) * 3 + 1
    w_out = torch.randn(8, 3, 4, 5, dtype=torch.float64)
    y, gx, gw, gb, rm, rv = _reference(x, w_out)
    out = str(tmp_path / "r")
    mp.spawn(_worker, args=(_free_port(), x, w_out, out), nprocs=2)
    r0, r1 = torch.load(f"{out}.0"), torch.load(f"{out}.1")
    torch.testing.assert_close(torch.cat([r0["y"], r1["y"]]), y)
    torch.testing.assert_close(torch.cat([r0["gx"], r1["gx"]]), gx)
    torch.testing.assert_close(r0["gw"], gw)
    torch.testing.assert_close(r1["gb"], gb)
    torch.testing.assert_close(r0["rm"], rm)
    torch.testing.assert_close(r1["rv"], rv)


def test_alone_it_is_plain_batchnorm_and_conversion_keeps_state():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Sequential(nn.BatchNorm2d(4)))
    with torch.no_grad():
        model[1].weight.uniform_()
        model[1].running_mean.uniform_()
    converted = convert_sync_batchnorm(model, torch.device("cpu"))
    assert isinstance(converted[1], CrossRankBatchNorm2d) and isinstance(converted[2][0], CrossRankBatchNorm2d)
    torch.testing.assert_close(converted[1].weight, model[1].weight)
    torch.testing.assert_close(converted[1].running_mean, model[1].running_mean)
    x = torch.randn(2, 3, 5, 5)
    torch.testing.assert_close(converted(x), model(x))

"""nn.LSTM, nn.GRU and nn.RNN (tanh or relu), in every configuration torch allows: layers,
bidirectional, proj_size, bias on or off, dropout between layers, given h0 (and c0), batch_first
either way, PackedSequence inputs of unequal lengths, sorted or not.

A recurrent layer does not mix samples, so from the captured inputs the rule recomputes the
recurrence once per call (`recompute`), batch first in the samples' own order (a PackedSequence
unpacked by its batch_sizes and sorted_indices; a finished sequence keeps its state, as torch's
packed recurrence does). Per layer and direction, with x_t the layer's input (the previous
layer's output after dropout) and h_{t-1} the state entering step t:

    P_t = x_t W_ih^T + b_ih                          (all steps at once: `Layer.pre`)
    LSTM: i, f, g, o = chunks of P_t + h_{t-1} W_hh^T + b_hh
          c_t = sig(f) c_{t-1} + sig(i) tanh(g),  m_t = sig(o) tanh(c_t),  h_t = m_t (W_hr^T with proj_size)
    GRU:  r, z = sig(P_r + H_r), sig(P_z + H_z) with H = h_{t-1} W_hh^T + b_hh
          n = tanh(P_n + r H_n),  h_t = (1 - z) n + z h_{t-1}
    RNN:  h_t = tanh or relu(P_t + h_{t-1} W_hh^T + b_hh)

One backward of the gradients at its outputs (the output sequence, h_n and c_n: the loss may
use any of them) gives dP, the gate gradients; the gradient at h_{t-1} W_hh^T + b_hh is dP too,
except in the GRU's n rows (r dP_n). Dropout between layers is drawn as torch draws it
(F.dropout on the time-major layer output, or on the packed data) from the RNG state saved
before the forward (rules/rng.py). Then every weight is a linear map over time steps, factored
(representations.Factored) with no per-sample gradient formed:

    g_i(W_ih) = sum_t dP_it x_it^T        (the layer's inputs x gate gradients)
    g_i(W_hh) = sum_t dH_it h_i,t-1^T     (the previous states x the gate gradients at h W_hh^T)
    g_i(W_hr) = sum_t dh_it m_it^T        (LSTM proj_size: dh the gradient at h_t)
    g_i(b_ih) = sum_t dP_it, g_i(b_hh) = sum_t dH_it   (a column of ones beside each weight's inputs)

A padded step (past a packed sequence's end) has zero gate gradients, so it adds nothing.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from gradalign.engine.representations import Factored
from gradalign.engine.rules.rng import RngState, replaying, save_rng


@dataclass
class Sequences:
    """A recurrent call's inputs, batch first in the samples' order.

    x: (B, T, I), zeros after each sequence's end; lengths: (B,) for a PackedSequence, else None;
    h0, c0: (L * D, B, H_out), (L * D, B, H) or None (zeros); packed: (time index, sample index)
    of each row of the packed data, or None; rng: the RNG state of dropout between layers, or None.
    """

    x: Tensor
    lengths: Tensor | None
    h0: Tensor | None
    c0: Tensor | None
    packed: tuple[Tensor, Tensor] | None
    rng: RngState | None
    training: bool

    def to_batch_first(self, data: Tensor) -> Tensor:
        """Packed rows (N, n) -> (B, T, n), zeros after each sequence's end."""
        t_index, s_index = self.packed
        out = data.new_zeros(self.x.shape[0], self.x.shape[1], data.shape[-1])
        return out.index_put((s_index, t_index), data)


@dataclass
class Layer:
    """One layer and direction of the recomputed recurrence: what its weights' gradients are formed from."""

    inputs: Tensor                 # (B, T, I_l) the layer's input
    pre: Tensor                    # (B, T, G H) x_t W_ih^T + b_ih: its gradient is the gate gradient
    prev: list[Tensor]             # T x (B, H_out): the state entering each step
    resets: list[Tensor] | None    # GRU: T x (B, H) r_t
    cells: list[Tensor] | None     # LSTM with proj_size: T x (B, H) m_t, W_hr's inputs
    projected: list[Tensor] | None  # and T x (B, P) h_t = m_t W_hr^T, whose gradients W_hr's factor takes


def packed_indices(batch_sizes: Tensor, sorted_indices: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """(time index, sample index) of each row of packed data, and each sample's length (B,)."""
    sizes = batch_sizes.tolist()
    B = sizes[0]
    t_index = torch.repeat_interleave(torch.arange(len(sizes)), batch_sizes.cpu())
    rank = torch.cat([torch.arange(n) for n in sizes])  # position in the sorted order
    order = torch.arange(B) if sorted_indices is None else sorted_indices.cpu()
    lengths = torch.zeros(B, dtype=torch.long).index_add_(0, order[rank], torch.ones_like(rank))
    return t_index, order[rank], lengths


def _weights(module: nn.RNNBase, layer: int, reverse: bool, dtype: torch.dtype) -> tuple:
    sfx = f"_l{layer}" + ("_reverse" if reverse else "")

    def get(name: str) -> Tensor | None:
        p = getattr(module, name + sfx, None)
        return None if p is None else p.detach().to(dtype)
    return get("weight_ih"), get("weight_hh"), get("bias_ih"), get("bias_hh"), get("weight_hr")


def _run_layer(module: nn.RNNBase, inputs: Tensor, h: Tensor, c: Tensor | None, weights: tuple,
               active: list[Tensor] | None, reverse: bool) -> tuple[Layer, list[Tensor], Tensor, Tensor | None]:
    """One direction of one layer: (Layer, T x (B, H_out) outputs, final h, final c)."""
    w_ih, w_hh, b_ih, b_hh, w_hr = weights
    pre = F.linear(inputs, w_ih, b_ih)
    if not pre.requires_grad:  # the first layer: its input is the captured data
        pre.requires_grad_()
    mode = module.mode
    T = inputs.shape[1]
    outs, prev = [None] * T, [None] * T
    resets = [None] * T if mode == "GRU" else None
    cells = [None] * T if w_hr is not None else None
    projected = [None] * T if w_hr is not None else None
    for t, p_t in (reversed(list(enumerate(pre.unbind(1)))) if reverse else enumerate(pre.unbind(1))):
        prev[t] = h
        if mode == "LSTM":
            i, f, g, o = (p_t + F.linear(h, w_hh, b_hh)).chunk(4, 1)
            c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h_new = torch.sigmoid(o) * torch.tanh(c_new)
            if w_hr is not None:
                cells[t] = h_new
                h_new = projected[t] = F.linear(h_new, w_hr)
        elif mode == "GRU":
            xr, xz, xn = p_t.chunk(3, 1)
            hr, hz, hn = F.linear(h, w_hh, b_hh).chunk(3, 1)
            r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
            resets[t] = r
            h_new = torch.lerp(torch.tanh(xn + r * hn), h, z)  # (1 - z) n + z h
        else:
            pre_t = p_t + F.linear(h, w_hh, b_hh)
            h_new = torch.tanh(pre_t) if mode == "RNN_TANH" else torch.relu(pre_t)
        outs[t] = h_new
        if active is None:
            h = h_new
            c = c_new if mode == "LSTM" else None
        else:  # a finished (or, in reverse, not yet started) sequence keeps its state
            h = torch.where(active[t], h_new, h)
            c = torch.where(active[t], c_new, c) if mode == "LSTM" else None
    return Layer(inputs, pre, prev, resets, cells, projected), outs, h, c


def _dropout(module: nn.RNNBase, out: Tensor, s: Sequences) -> Tensor:
    """Dropout between layers as torch draws it: on the time-major (T, B, n) output, or the packed data."""
    if s.packed is None:
        return F.dropout(out.transpose(0, 1).contiguous(), module.dropout, training=True).transpose(0, 1)
    t_index, s_index = s.packed
    return s.to_batch_first(F.dropout(out[s_index, t_index], module.dropout, training=True))


def recompute(module: nn.RNNBase, s: Sequences, dtype: torch.dtype) -> tuple[list[Layer], Tensor, Tensor, Tensor | None]:
    """(layers in the order of torch's parameters, output (B, T, D H_out), h_n, c_n), differentiable
    w.r.t. each Layer.pre."""
    B, T, _ = s.x.shape
    D = 2 if module.bidirectional else 1
    H_out = module.proj_size or module.hidden_size
    lstm = module.mode == "LSTM"
    h0 = s.x.new_zeros(module.num_layers * D, B, H_out, dtype=dtype) if s.h0 is None else s.h0.to(dtype)
    c0 = None if not lstm else (s.x.new_zeros(module.num_layers * D, B, module.hidden_size, dtype=dtype)
                                if s.c0 is None else s.c0.to(dtype))
    active = None if s.lengths is None else list((s.lengths.to(s.x.device).unsqueeze(1) > torch.arange(
        T, device=s.x.device)).T.unsqueeze(-1).unbind(0))  # T x (B, 1)
    layers, finals_h, finals_c = [], [], []
    inputs = s.x.to(dtype)
    with replaying(s.rng):
        for layer in range(module.num_layers):
            outs = []
            for direction in range(D):
                k = layer * D + direction
                done, out, h, c = _run_layer(module, inputs, h0[k], None if c0 is None else c0[k],
                                             _weights(module, layer, direction == 1, dtype), active, direction == 1)
                layers.append(done)
                outs.append(torch.stack(out, 1))
                finals_h.append(h)
                finals_c.append(c)
            output = outs[0] if D == 1 else torch.cat(outs, -1)
            if s.training and module.dropout > 0 and layer < module.num_layers - 1:
                output = _dropout(module, output, s)
            inputs = output
    return layers, output, torch.stack(finals_h), (torch.stack(finals_c) if lstm else None)


def _bind(args: tuple, kwargs: dict) -> tuple:
    values = {**dict(zip(("input", "hx"), args)), **kwargs}
    return values.get("input"), values.get("hx")


def _states(hx) -> tuple[Tensor | None, Tensor | None]:
    if hx is None:
        return None, None
    if isinstance(hx, (tuple, list)):
        return hx[0].detach(), hx[1].detach()
    return hx.detach(), None


def recurrent_capture(module: nn.RNNBase, args: tuple, kwargs: dict, batch_dim: int) -> tuple:
    """(x batch first (B, T, I), Sequences); the module's own batch_first decides its layout.
    Runs before the forward, so with dropout between layers it saves the RNG state."""
    data, hx = _bind(args, kwargs)
    h0, c0 = _states(hx)
    packed = lengths = None
    if isinstance(data, PackedSequence):
        t_index, s_index, lengths = packed_indices(data.batch_sizes, data.sorted_indices)
        device = data.data.device
        packed = (t_index.to(device), s_index.to(device))
        x = data.data.detach().new_zeros(len(lengths), len(data.batch_sizes), data.data.shape[-1])
        x = x.index_put(packed[::-1], data.data.detach())
    elif isinstance(data, Tensor) and data.dim() == 3:
        x = data.detach() if module.batch_first else data.detach().transpose(0, 1)
    else:
        return (data,)  # unbatched: refused by recurrent_check_call after the forward
    dropout = module.training and module.dropout > 0 and module.num_layers > 1
    return x, Sequences(x, lengths, h0, c0, packed, save_rng(x.device) if dropout else None, module.training)


def recurrent_check_call(module: nn.RNNBase, args: tuple, kwargs: dict, output) -> str | None:
    data, _ = _bind(args, kwargs)
    if isinstance(data, Tensor) and data.dim() != 3:
        return (f"an unbatched {data.dim()}-D input has no batch to take per-sample gradients over; give it a batch "
                f"dim (x.unsqueeze({0 if module.batch_first else 1}), with h0 as (layers, 1, hidden))")
    device = (data.data if isinstance(data, PackedSequence) else data).device
    if (module.training and module.dropout > 0 and module.num_layers > 1 and device.type == "cuda"
            and torch.backends.cudnn.enabled and torch.backends.cudnn.is_available()):
        return ("cuDNN draws the dropout between recurrent layers from its own state, which the engine cannot "
                "replay; run the layer with `torch.backends.cudnn.flags(enabled=False)` around the forward (torch's "
                "own recurrence draws from the global generator), or construct it with dropout=0")
    return None


def recurrent_output(output) -> tuple:
    """(output sequence or packed data, h_n, c_n or None)."""
    out, hidden = output
    h, c = hidden if isinstance(hidden, tuple) else (hidden, None)
    return (out.data if isinstance(out, PackedSequence) else out), h, c


def _dtype(module: nn.RNNBase, x: Tensor) -> torch.dtype:
    """The recompute's precision: at least float32 (float64 for a float64 model)."""
    return torch.promote_types(torch.promote_types(x.dtype, module.weight_ih_l0.dtype), torch.float32)


def _output_grad(module: nn.RNNBase, s: Sequences, d: Tensor) -> Tensor:
    """The gradient at the output sequence, (B, T, D H_out) batch first in the samples' order."""
    if s.packed is not None:
        return s.to_batch_first(d)
    return d if module.batch_first else d.transpose(0, 1)


def _gate_grads(module: nn.RNNBase, s: Sequences, grad_output: tuple, dtype: torch.dtype):
    """The recomputed layers and, per layer and direction, (dP, dH, dh of proj_size or None)."""
    d_out, d_h, d_c = grad_output
    with torch.enable_grad():
        layers, out, h_n, c_n = recompute(module, s, dtype)
        outputs, grads = [], []
        for value, d in ((out, None if d_out is None else _output_grad(module, s, d_out)), (h_n, d_h), (c_n, d_c)):
            if d is not None and value is not None:
                outputs.append(value)
                grads.append(d.to(dtype))
        targets = [layer.pre for layer in layers] + [h for layer in layers for h in (layer.projected or ())]
        got = torch.autograd.grad(outputs, targets, grads, allow_unused=True)
    got = [torch.zeros_like(t) if g is None else g for t, g in zip(targets, got)]
    d_pre, d_proj = got[:len(layers)], iter(got[len(layers):])
    result = []
    for layer, dP in zip(layers, d_pre):
        dH = dP
        if layer.resets is not None:  # the GRU's n rows: the gradient at h W_hn^T + b_hn is r dP_n
            H = dP.shape[-1] // 3
            dH = torch.cat([dP[..., :2 * H], dP[..., 2 * H:] * torch.stack(layer.resets, 1).detach()], -1)
        dh = None if layer.projected is None else torch.stack([next(d_proj) for _ in layer.projected], 1)
        result.append((dP, dH, dh))
    return layers, result


def recurrent_rule(module: nn.RNNBase, args: tuple, grad_output: tuple) -> dict:
    _, s = args
    dtype = _dtype(module, s.x)
    layers, gate_grads = _gate_grads(module, s, grad_output, dtype)
    D = 2 if module.bidirectional else 1
    grads = {}

    def add(name: str, factored: Factored, bias: str | None) -> None:
        weight = getattr(module, name)
        if weight.requires_grad:
            grads[name] = factored
        b = None if bias is None else getattr(module, bias, None)
        if b is not None and b.requires_grad:
            grads[bias] = factored.bias()

    for k, (layer, (dP, dH, dh)) in enumerate(zip(layers, gate_grads)):
        sfx = f"_l{k // D}" + ("_reverse" if k % D else "")
        shape = getattr(module, "weight_ih" + sfx).shape
        add("weight_ih" + sfx, Factored(layer.inputs.detach().unsqueeze(1), dP.unsqueeze(1), shape),
            "bias_ih" + sfx if module.bias else None)
        prev = torch.stack(layer.prev, 1).detach()
        add("weight_hh" + sfx, Factored(prev.unsqueeze(1), dH.unsqueeze(1), getattr(module, "weight_hh" + sfx).shape),
            "bias_hh" + sfx if module.bias else None)
        if dh is not None:
            cells = torch.stack(layer.cells, 1).detach()
            add("weight_hr" + sfx, Factored(cells.unsqueeze(1), dh.unsqueeze(1), getattr(module, "weight_hr" + sfx).shape),
                None)
    return grads


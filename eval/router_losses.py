"""The ``aux_loss`` arm's training objective: next-token CE plus the family's own router losses.

The standard way to balance an MoE is an auxiliary loss on the router: Switch Transformers'
load-balancing loss (Fedus et al. 2021, eqs. 4–6) and router z-loss (Zoph et al. 2022), Mixtral's
and the other decoder-only families' top-k load-balancing loss. The arm trains with

    loss = CE + router_aux_loss_coef · aux + router_z_loss_coef · z

with the coefficients from the model's config, computed from the model's own router outputs (a
forward with ``output_router_logits=True``) by transformers' own functions for the family:

* **Switch Transformers** (encoder–decoder): ``router_z_loss_func`` and ``load_balancing_loss_func``
  of ``modeling_switch_transformers`` on the **decoder** routers only (the encoder reads one pad
  token, see :mod:`.inputs`), each layer's logits concatenated along the sequence as HF's
  ``_unpack_router_logits`` does. Two deliberate differences from HF's own forward: padding
  positions are left out (each sequence's real positions form its group; on an unpadded batch the
  values are HF's exactly), and the losses are computed whatever the sparse step (HF's forward
  skips both when every block is sparse).
* **decoder-only families** (Mixtral, Qwen-MoE, OLMoE, …): the ``aux_loss`` the model returns,
  computed by its family's ``load_balancing_loss_func`` with the attention mask; ``z`` is 0 unless
  the config has a ``router_z_loss_coef`` (none of them computes a z-loss).

The controller is off in this arm (identity routing), so the router logits are the model's own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from chronovisor.eval.inputs import ModelInputs, is_encoder_decoder, model_of, token_cross_entropy


@dataclass
class RouterLosses:
    """The router losses of one forward, before their coefficients.

    Attributes:
        aux: the load-balancing loss; ``z``: the router z-loss (0 where the family has none).
        aux_coef, z_coef: the config's ``router_aux_loss_coef`` and ``router_z_loss_coef`` (0 if absent).
    """

    aux: torch.Tensor
    z: torch.Tensor
    aux_coef: float
    z_coef: float

    @property
    def weighted(self) -> torch.Tensor:
        """``aux_coef · aux + z_coef · z``: what the objective adds to the CE."""
        return self.aux_coef * self.aux + self.z_coef * self.z


def coefficients(model: torch.nn.Module) -> tuple[float, float]:
    """``(router_aux_loss_coef, router_z_loss_coef)`` of the model's config; a ValueError naming the
    model class when it has no auxiliary-loss coefficient."""
    config = model_of(model).config
    aux_coef = getattr(config, "router_aux_loss_coef", None)
    if aux_coef is None:
        raise ValueError(f"aux_loss: {type(model_of(model)).__name__} has no router_aux_loss_coef in its config")
    return float(aux_coef), float(getattr(config, "router_z_loss_coef", 0.0) or 0.0)


def switch_decoder_losses(router_logits: tuple[torch.Tensor, ...], mask: torch.Tensor
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(aux, z)`` of Switch's decoder routers with transformers' functions, padding left out.

    Args:
        router_logits: one ``[B, S, E]`` tensor per decoder MoE layer (``decoder_router_logits``).
        mask: ``[B, S]`` decoder attention mask (1 = real position).

    Each sequence's real positions of every layer form one group (``[1, n_b·L, E]``). The z-loss is
    the mean of log-z² over every real position and layer; the aux loss the mean over sequences of
    each group's load-balancing loss. With no padding this is HF's value on ``[B, S·L, E]``.
    """
    from transformers.models.switch_transformers.modeling_switch_transformers import (
        load_balancing_loss_func,
        router_z_loss_func,
    )

    keep = mask.bool()
    z_terms, aux_terms, counts = [], [], []
    for b in range(mask.shape[0]):
        logits = torch.cat([layer[b][keep[b]] for layer in router_logits], dim=0).unsqueeze(0)   # [1, n_b·L, E]
        if logits.shape[1] == 0:
            continue
        z_terms.append(router_z_loss_func(logits))
        aux_terms.append(load_balancing_loss_func(torch.softmax(logits, dim=-1), logits.argmax(dim=-1)))
        counts.append(logits.shape[1])
    weights = torch.tensor(counts, dtype=torch.float32, device=mask.device)
    z = (torch.stack(z_terms) * weights).sum() / weights.sum()
    return torch.stack(aux_terms).mean(), z


def router_losses(model: torch.nn.Module, output, inputs: ModelInputs) -> RouterLosses:
    """The router losses of ``output``, a forward of ``model`` on ``inputs`` with
    ``output_router_logits=True`` (see the module docstring for each family)."""
    aux_coef, z_coef = coefficients(model)
    hf_model = model_of(model)
    if is_encoder_decoder(hf_model):
        logits = output.decoder_router_logits
        if not logits:
            raise ValueError(f"aux_loss: {type(hf_model).__name__} returned no decoder router logits")
        aux, z = switch_decoder_losses(tuple(logits), inputs.kwargs["decoder_attention_mask"])
        return RouterLosses(aux, z, aux_coef, z_coef)
    aux = getattr(output, "aux_loss", None)
    if not isinstance(aux, torch.Tensor):
        raise ValueError(f"aux_loss: {type(hf_model).__name__} returned no aux_loss with output_router_logits=True")
    return RouterLosses(aux, torch.zeros((), device=aux.device), aux_coef, z_coef)


def aux_loss_objective(model: torch.nn.Module, inputs: ModelInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """``(CE + aux_coef·aux + z_coef·z, CE)`` of one forward of ``model`` on ``inputs``: the loss to
    minimise and the next-token CE (what the controller ticks on and the training curve records)."""
    output = model(**inputs.kwargs, use_cache=False, output_router_logits=True)
    total, count = token_cross_entropy(output.logits, inputs.targets)
    ce = total / max(count, 1)
    return ce + router_losses(model, output, inputs).weighted.to(ce.device), ce

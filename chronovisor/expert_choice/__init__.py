"""The Expert Choice MoE model (experts choose tokens), registered with the transformers Auto classes.

    from chronovisor.expert_choice import ExpertChoiceConfig, ExpertChoiceForCausalLM
    model = ExpertChoiceForCausalLM(ExpertChoiceConfig(num_local_experts=8, capacity_factor=2.0))
    model.save_pretrained(path); AutoModelForCausalLM.from_pretrained(path)   # after this import
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from chronovisor.expert_choice.configuration_expert_choice import INFERENCE_ROUTINGS, ExpertChoiceConfig
from chronovisor.expert_choice.modeling_expert_choice import (
    ExpertChoiceForCausalLM,
    ExpertChoiceModel,
    ExpertChoicePreTrainedModel,
    ExpertChoiceRouter,
    expert_capacity,
    expert_choice_routing,
    nominal_top_k,
)

AutoConfig.register(ExpertChoiceConfig.model_type, ExpertChoiceConfig, exist_ok=True)
AutoModel.register(ExpertChoiceConfig, ExpertChoiceModel, exist_ok=True)
AutoModelForCausalLM.register(ExpertChoiceConfig, ExpertChoiceForCausalLM, exist_ok=True)

__all__ = [
    "INFERENCE_ROUTINGS",
    "ExpertChoiceConfig",
    "ExpertChoiceForCausalLM",
    "ExpertChoiceModel",
    "ExpertChoicePreTrainedModel",
    "ExpertChoiceRouter",
    "expert_capacity",
    "expert_choice_routing",
    "nominal_top_k",
]

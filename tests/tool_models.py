"""Random-weight checkpoints whose chat templates render tools (Hermes / Qwen 2.5, Mistral and
Llama 3.1 styles), for
the structured-output and tool-calling tests: test.tiny's weights and tokenizer, a longer
position limit (the tool list makes long prompts) and the template below, which lists each tool by its name and argument names (a short prompt:
test.tiny's window is small)."""
from __future__ import annotations

import json
from pathlib import Path

HERMES_TEMPLATE = (
    "{% if tools %}<|im_start|>system\n"
    "{% if messages[0].role == 'system' %}{{ messages[0].content }}\n{% endif %}"
    "<tools>{% for tool in tools %}{% set fn = tool.function %} {{ fn.name }}("
    "{{ (fn.parameters.properties or {}) | list | join(', ') }}){% endfor %}\n</tools>\n"
    "Call: <tool_call>\n{\"name\": ..., \"arguments\": {...}}\n</tool_call><|im_end|>\n"
    "{% elif messages[0].role == 'system' %}<|im_start|>system\n{{ messages[0].content }}<|im_end|>\n"
    "{% endif %}"
    "{% for message in messages %}"
    "{% if message.role == 'system' and loop.first %}"
    "{% elif message.role == 'assistant' and message.tool_calls %}<|im_start|>assistant\n"
    "{% if message.content %}{{ message.content }}{% endif %}"
    "{% for call in message.tool_calls %}{% set fn = call.function %}\n<tool_call>\n"
    "{\"name\": \"{{ fn.name }}\", \"arguments\": {{ fn.arguments | tojson }}}\n</tool_call>"
    "{% endfor %}<|im_end|>\n"
    "{% elif message.role == 'tool' %}<|im_start|>user\n<tool_response>\n{{ message.content }}\n"
    "</tool_response><|im_end|>\n"
    "{% else %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


#: Mistral's format: `[AVAILABLE_TOOLS]` in the prompt, the reply `[TOOL_CALLS][{...}, ...]`.
MISTRAL_TEMPLATE = (
    "{% if tools %}[AVAILABLE_TOOLS]{% for tool in tools %} {{ tool.function.name }}{% endfor %}"
    "[/AVAILABLE_TOOLS]{% endif %}"
    "{% for message in messages %}"
    "{% if message.role == 'user' %}[INST] {{ message.content }} [/INST]"
    "{% elif message.role == 'assistant' and message.tool_calls %}[TOOL_CALLS]["
    "{% for call in message.tool_calls %}{\"name\": \"{{ call.function.name }}\", \"arguments\": "
    "{{ call.function.arguments | tojson }}}{% if not loop.last %}, {% endif %}{% endfor %}]</s>"
    "{% elif message.role == 'tool' %}[TOOL_RESULTS] {{ message.content }} [/TOOL_RESULTS]"
    "{% else %}{{ message.content }}</s>{% endif %}{% endfor %}"
)
#: Llama 3.1's JSON format (its header tokens shortened: the tiny tokenizer spells them out):
#: tools listed for the `ipython` role, the reply `{"name": ..., "parameters": {...}}`
#: (several separated by `;`).
LLAMA3_TEMPLATE = (
    "{% if tools %}ipython:{% for tool in tools %} {{ tool.function.name }}{% endfor %}\n{% endif %}"
    "{% for message in messages %}{{ 'ipython' if message.role == 'tool' else message.role }}: "
    "{% if message.tool_calls %}{% for call in message.tool_calls %}{\"name\": \"{{ call.function.name }}\", "
    "\"parameters\": {{ call.function.arguments | tojson }}}{% endfor %}{% else %}{{ message.content }}{% endif %}"
    "\n{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
)


def save_tool_model(out_dir: Path, template: str = HERMES_TEMPLATE) -> Path:
    """test.tiny as a Hugging Face directory (`lm.hf`) with a tools template (Hermes by default)."""
    from model_server.models import tiny

    out = tiny.save_hf(out_dir)
    hf = tiny.build_hf_tokenizer()
    hf.chat_template = template
    hf.save_pretrained(str(out))
    json.loads((out / "config.json").read_text())
    return out

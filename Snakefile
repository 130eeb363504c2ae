# convqa: qualify model-format converters between SafeTensors, GGUF and APR.
#
# results/{model}/source/                          S ground truth (config, tokenizer, *.safetensors)
# results/{model}/{variant}/{chain}/model.{ext}    one conversion artifact per chain (st-gguf, st-gguf-apr, ...)
# results/{model}/{variant}/{chain}/sidecar.json   sha256, size, converter, fingerprint, argv, time, memory
# results/{model}/{variant}/{chain}/manifest.json  tensors, config, tokenizer as read back
# results/{model}/{variant}/compare/{subject}~{reference}.json
# results/{model}/{variant}/xconv/{converter}/{chain}/...  a second converter on an edge (rules/xconv.smk)
# results/{model}/{variant}/gates/{tier}/tensor.tsv, inference.tsv (rules/infer.smk has the inference paths)
# results/{model}/report/{tier}/qualification.json, report.md, report.html, junit.xml
# results/summary/{tier}/summary.json, summary.md
# results/{model}/{variant}/{chain}/released-{tier}.json  the artifact deleted after use (rules/intermediates.smk)
#
# Every path is built by convqa.workflow.paths, everything else a rule computes by
# convqa.workflow.jobs (`J`, made in rules/common.smk); see README for usage.

from snakemake.exceptions import WorkflowError
from snakemake.utils import min_version

min_version("9.11")


configfile: "config/config.yaml"


# The description `snakemake --report` opens with; rules/report.smk attaches the outputs.
report: "rules/captions/workflow.rst"


# A `detection:` section (config/detection.yaml) adds one model per converter mutant and the
# mutant converters before anything reads the model list (rules/detection.smk).
from convqa.detection import matrix as convqa_detection

try:
    convqa_detection.expand_config(config)
except convqa_detection.DetectionConfigError as exc:
    raise WorkflowError(str(exc))


# Snakemake 9.27's scheduler starts a new wake-up timer on every pass, so its passes per second
# grow with the jobs run (half a core by the end of `make run`): keep one pending at a time.
from convqa.workflow import scheduler_timers


onstart:
    scheduler_timers.install(workflow)
    # A `--resources` on the command line replaces profiles/default's list, and with it the limit
    # that keeps big conversions apart (Jobs.conversion_slots): say so, once, before anything runs.
    if J.conversion_slots_provided is None and config["temp_intermediates"]:
        print(jobs.UNLIMITED_CONVERSIONS_NOTE, file=sys.stderr)


include: "rules/common.smk"
include: "rules/sources.smk"
include: "rules/convert.smk"
include: "rules/xconv.smk"
include: "rules/inspect.smk"
include: "rules/compare.smk"
include: "rules/infer.smk"
include: "rules/report.smk"
include: "rules/intermediates.smk"
include: "rules/detection.smk"


rule all:
    default_target: True
    input:
        J.tier_targets(TIER),


rule smoke:
    input:
        J.tier_targets("smoke"),


rule mvp:
    input:
        J.tier_targets("mvp"),


rule full:
    input:
        J.tier_targets("full"),

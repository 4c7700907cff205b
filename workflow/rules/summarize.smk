# Stage 9: the report's summary table: particles in / kept / removed, epochs, run times from the
# benchmark files, resolutions and ground-truth metrics, as JSON and as an HTML table for the report.


localrules:
    summarize,


rule summarize:
    input:
        unpack(get_summary_inputs),
    output:
        json=f"{R}/report/summary.json",
        html=report(
            f"{R}/report/summary.html",
            caption="../report/summary.rst",
            category="0. Summary",
            labels={"table": "summary"},
        ),
    log:
        "logs/summarize/summarize.log",
    benchmark:
        # top level: the summary reads benchmarks/<stage>/*.tsv and cannot time itself
        "benchmarks/summarize.tsv"
    conda:
        "../../envs/cpu.yaml"
    threads: get_threads("summarize")
    resources:
        **get_resources("summarize"),
    params:
        pilots=lambda wildcards, input: [str(Path(m).parent) for m in input.pilots],
        highres=lambda wildcards, input: str(Path(input.highres).parent),
        filter_dir=lambda wildcards, input: str(Path(input.kept).parent),
        metrics=lambda wildcards, input: " ".join(
            f"--metrics {m}" for m in input.metrics
        ),
        backproject=lambda wildcards, input: (
            f"--backproject {Path(input.backproject[0]).parent}"
            if input.backproject
            else ""
        ),
        benchmarks="benchmarks",
        version=DRGN_VERSION,
    shell:
        "drgn summarize --table {input.table} --filter-dir {params.filter_dir} "
        "--pilot {params.pilots} --highres {params.highres} {params.backproject} {params.metrics} "
        "--benchmarks {params.benchmarks} -o {output.json} --html {output.html} > {log} 2>&1"

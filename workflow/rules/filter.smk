# Stage 3: the declarative particle filter. The spec (which filters of which pilot, combined as the config
# says; the paper intersects the kept sets of its 1-D and 10-D pilots) is written from the config, so a
# changed filter setting reruns only this stage and what follows it.


localrules:
    write_filter_spec,


rule write_filter_spec:
    output:
        spec=f"{R}/filter_spec.yaml",
    log:
        get_log("filter", "spec"),
    benchmark:
        get_benchmark("filter", "spec")
    conda:
        "../../envs/cpu.yaml"
    threads: 1
    resources:
        **get_resources("filter"),
    params:
        spec=get_filter_spec(),
    script:
        "../scripts/write_filter_spec.py"


rule filter_particles:
    input:
        spec=f"{R}/filter_spec.yaml",
        models=get_filtered_pilot_models,
        selections=get_filter_selections,
        table=TABLE,
    output:
        kept=f"{FILTER}/kept.npy",
        kept_txt=f"{FILTER}/kept.txt",
        removed=f"{FILTER}/removed.npy",
        removed_txt=f"{FILTER}/removed.txt",
        summary=f"{FILTER}/filter.json",
        plot=report(
            f"{FILTER}/filter.png",
            caption="../report/filter.rst",
            category="2. Particle filter",
            labels={"figure": "kept and removed particles"},
        ),
    log:
        get_log("filter", "filter"),
    benchmark:
        get_benchmark("filter", "filter")
    conda:
        "../../envs/cpu.yaml"
    threads: get_threads("filter")
    resources:
        **get_resources("filter"),
    params:
        outdir=folder_of_output("kept"),
        # with ground truth, filter.json also scores the removed set against the injected junk
        ground_truth_table=lambda wildcards, input: (
            f"--table {input.table}" if GROUND_TRUTH else ""
        ),
        version=DRGN_VERSION,
    shell:
        "drgn filter --spec {input.spec} {params.ground_truth_table} -o {params.outdir} > {log} 2>&1"

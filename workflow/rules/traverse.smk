# Stage 6: a path through the latent space (the paper's nearest-neighbour graph traversal between
# anchors, by default k-means on-data centres), decoded to volumes along the way.


rule traverse_highres:
    input:
        **get_run_outputs(HIGHRES),
    output:
        outdir=report(
            directory(f"{R}/highres/traverse"),
            patterns=["{name}.png"],
            caption="../report/traverse.rst",
            category=get_report_category("4. Latent space"),
            labels=get_report_label("traversal ({name})"),
        ),
    log:
        "logs/traverse/traverse.log",
    benchmark:
        "benchmarks/traverse/traverse.tsv"
    conda:
        "../../envs/cpu.yaml"
    threads: get_threads("traverse")
    resources:
        **get_resources("traverse"),
    params:
        run=folder_of_input("model"),
        t=config["traverse"],
        anchors=get_traverse_anchors(),
        device=config["device"],
        version=DRGN_VERSION,
    shell:
        "drgn traverse {params.run} -o {output.outdir} --method {params.t[method]} {params.anchors} "
        "--max-volumes {params.t[max_volumes]} --device {params.device} > {log} 2>&1"

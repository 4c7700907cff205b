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
        get_log("traverse", "traverse"),
    benchmark:
        get_benchmark("traverse", "traverse")
    conda:
        "../../envs/cpu.yaml"
    threads: get_threads("traverse")
    resources:
        **get_resources("traverse"),
    params:
        run_dir=folder_of_input("model"),
        traversal=config["traverse"],
        anchor_flags=get_traverse_anchors(),
        device=config["device"],
        version=DRGN_VERSION,
    shell:
        "drgn traverse {params.run_dir} -o {output.outdir} --method {params.traversal[method]} "
        "{params.anchor_flags} --max-volumes {params.traversal[max_volumes]} --device {params.device} "
        "> {log} 2>&1"

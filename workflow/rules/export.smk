# Stage 8: the kept particles written back for the tools they came from: a row subset of the original
# RELION STAR, a cryoSPARC .cs + .csg when the input was a .cs, a uid list, index files and ChimeraX
# scripts that open the k-means volumes.


rule export_kept:
    input:
        table=TABLE,
        kept=f"{FILTER}/kept.npy",
        source=get_export_source,
        volumes=f"{R}/highres/analyze",
    output:
        outdir=directory(f"{R}/export"),
    log:
        get_log("export", "export"),
    benchmark:
        get_benchmark("export", "export")
    conda:
        "../../envs/cpu.yaml"
    threads: get_threads("export")
    resources:
        **get_resources("export"),
    params:
        export_name=config["export"]["name"],
        kmeans_k=config["analyze"]["ksample"],
        version=DRGN_VERSION,
    shell:
        "drgn export {input.table} --ind {input.kept} -o {output.outdir} --source {input.source:q} "
        "--name {params.export_name} --volumes {input.volumes}/kmeans{params.kmeans_k} > {log} 2>&1"

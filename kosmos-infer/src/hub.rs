//! `--model REPO_ID`: fetch a model repository from the Hugging Face hub into the local cache
//! (the `hub` cargo feature, through the `hf-hub` crate) and use its snapshot directory.

use std::path::PathBuf;

use hf_hub::api::sync::Api;

/// Download (or find in the cache) the files a KOSMOS-2 model directory needs; returns the
/// snapshot directory.
pub fn download(repo_id: &str) -> Result<PathBuf, String> {
    let fail = |file: &str, e: hf_hub::api::sync::ApiError| format!("`{repo_id}`: fetching {file}: {e}");
    let api = Api::new().map_err(|e| format!("`{repo_id}`: cannot open the hub cache: {e}"))?;
    let repo = api.model(repo_id.to_string());
    let config = repo.get("config.json").map_err(|e| fail("config.json", e))?;
    for file in ["tokenizer.json", "preprocessor_config.json"] {
        repo.get(file).map_err(|e| fail(file, e))?;
    }
    // Optional files.
    let _ = repo.get("generation_config.json");
    if repo.get("model.safetensors").is_err() {
        let index = repo
            .get("model.safetensors.index.json")
            .map_err(|e| fail("model.safetensors or model.safetensors.index.json", e))?;
        let text = std::fs::read_to_string(&index).map_err(|e| format!("{}: {e}", index.display()))?;
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| format!("{}: not valid JSON: {e}", index.display()))?;
        let mut shards: Vec<String> = json["weight_map"]
            .as_object()
            .map(|m| m.values().filter_map(|v| v.as_str().map(str::to_string)).collect())
            .unwrap_or_default();
        shards.sort();
        shards.dedup();
        for shard in shards {
            repo.get(&shard).map_err(|e| fail(&shard, e))?;
        }
    }
    config
        .parent()
        .map(|p| p.to_path_buf())
        .ok_or_else(|| format!("`{repo_id}`: unexpected cache layout"))
}

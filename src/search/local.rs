//! A sentence-embedding model run in-process on the CPU (feature
//! `local-embeddings`): a BERT-family encoder (e.g. all-MiniLM-L6-v2) from
//! a directory holding `config.json`, `vocab.txt` and `model.safetensors`,
//! with its WordPiece tokenizer, mean pooling over the tokens and unit
//! length, as sentence-transformers computes it. Nothing is downloaded:
//! `scripts/install-model.sh` puts the files in place beforehand.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config as BertConfig};
use sha2::{Digest, Sha256};
use unicode_normalization::UnicodeNormalization;

use super::embed::{Embedder, normalise};
use crate::error::{Error, Result};

/// Texts embedded per forward pass.
const BATCH: usize = 16;

/// A local sentence-embedding model.
pub struct LocalEmbedder {
    name: String,
    inner: Arc<Model>,
}

struct Model {
    bert: BertModel,
    tokenizer: WordPiece,
    max_tokens: usize,
}

fn model_error(dir: &Path, what: impl std::fmt::Display) -> Error {
    Error::invalid(
        "search.model_dir",
        format!(
            "{}: {what} (install a model with scripts/install-model.sh)",
            dir.display()
        ),
    )
}

impl LocalEmbedder {
    /// Loads the model in `dir`. Errors name the missing or unreadable file.
    pub fn load(dir: &Path) -> Result<LocalEmbedder> {
        let read = |name: &str| -> Result<Vec<u8>> {
            std::fs::read(dir.join(name)).map_err(|e| model_error(dir, format!("{name}: {e}")))
        };
        let config: BertConfig = serde_json::from_slice(&read("config.json")?)
            .map_err(|e| model_error(dir, format!("config.json: {e}")))?;
        let vocab = String::from_utf8(read("vocab.txt")?)
            .map_err(|_| model_error(dir, "vocab.txt is not UTF-8"))?;
        let lowercase = match std::fs::read(dir.join("tokenizer_config.json")) {
            Ok(b) => serde_json::from_slice::<serde_json::Value>(&b)
                .ok()
                .and_then(|v| v["do_lower_case"].as_bool())
                .unwrap_or(true),
            Err(_) => true,
        };
        let max_tokens = std::fs::read(dir.join("sentence_bert_config.json"))
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .and_then(|v| v["max_seq_length"].as_u64())
            .map_or(256, |n| n as usize)
            .min(config.max_position_embeddings);
        let weights = read("model.safetensors")?;
        let digest = hex::encode(Sha256::digest(&weights));
        let vb = VarBuilder::from_buffered_safetensors(weights, DType::F32, &Device::Cpu)
            .map_err(|e| model_error(dir, format!("model.safetensors: {e}")))?;
        let bert = BertModel::load(vb, &config)
            .map_err(|e| model_error(dir, format!("not a BERT model: {e}")))?;
        let tokenizer = WordPiece::new(&vocab, lowercase)
            .ok_or_else(|| model_error(dir, "vocab.txt lacks [CLS], [SEP] or [UNK]"))?;
        let base = dir
            .file_name()
            .map_or_else(|| "model".into(), |n| n.to_string_lossy().into_owned());
        Ok(LocalEmbedder {
            // The digest ties stored vectors to these exact weights.
            name: format!("local:{base}:{}", &digest[..12]),
            inner: Arc::new(Model {
                bert,
                tokenizer,
                max_tokens: max_tokens.max(2),
            }),
        })
    }
}

impl Model {
    fn embed_batch(&self, texts: &[String]) -> candle_core::Result<Vec<Vec<f32>>> {
        let ids: Vec<Vec<u32>> = texts
            .iter()
            .map(|t| self.tokenizer.encode(t, self.max_tokens))
            .collect();
        let len = ids.iter().map(Vec::len).max().unwrap_or(2);
        let n = ids.len();
        let mut flat = Vec::with_capacity(n * len);
        let mut mask = Vec::with_capacity(n * len);
        for row in &ids {
            flat.extend_from_slice(row);
            flat.extend(std::iter::repeat_n(0u32, len - row.len()));
            mask.extend(std::iter::repeat_n(1u32, row.len()));
            mask.extend(std::iter::repeat_n(0u32, len - row.len()));
        }
        let dev = &Device::Cpu;
        let input = Tensor::from_vec(flat, (n, len), dev)?;
        let mask = Tensor::from_vec(mask, (n, len), dev)?;
        let types = input.zeros_like()?;
        let out = self.bert.forward(&input, &types, Some(&mask))?;
        // Mean over the real tokens.
        let m = mask.to_dtype(DType::F32)?.unsqueeze(2)?;
        let summed = out.broadcast_mul(&m)?.sum(1)?;
        let counts = m.sum(1)?;
        let mean = summed.broadcast_div(&counts)?;
        Ok(mean.to_vec2::<f32>()?.into_iter().map(normalise).collect())
    }
}

#[async_trait]
impl Embedder for LocalEmbedder {
    fn model(&self) -> &str {
        &self.name
    }

    async fn embed(&self, texts: &[String]) -> Result<Vec<Vec<f32>>> {
        let model = self.inner.clone();
        let texts = texts.to_vec();
        tokio::task::spawn_blocking(move || {
            let mut out = Vec::with_capacity(texts.len());
            for chunk in texts.chunks(BATCH) {
                out.extend(model.embed_batch(chunk).map_err(|e| {
                    Error::Io(std::io::Error::other(format!("local embedding model: {e}")))
                })?);
            }
            Ok(out)
        })
        .await
        .map_err(|e| Error::Io(std::io::Error::other(format!("local embedding model: {e}"))))?
    }
}

/// BERT's tokenizer: basic splitting (control characters dropped, CJK
/// characters and punctuation split off, lowercase and accents stripped
/// for uncased models), then greedy longest-match WordPiece.
struct WordPiece {
    vocab: HashMap<String, u32>,
    lowercase: bool,
    cls: u32,
    sep: u32,
    unk: u32,
}

/// Words longer than this (in characters) become `[UNK]`, as in BERT.
const MAX_WORD_CHARS: usize = 100;

impl WordPiece {
    fn new(vocab: &str, lowercase: bool) -> Option<WordPiece> {
        let vocab: HashMap<String, u32> = vocab
            .lines()
            .enumerate()
            .map(|(i, t)| (t.trim_end_matches('\r').to_string(), i as u32))
            .collect();
        Some(WordPiece {
            cls: *vocab.get("[CLS]")?,
            sep: *vocab.get("[SEP]")?,
            unk: *vocab.get("[UNK]")?,
            vocab,
            lowercase,
        })
    }

    /// `[CLS] tokens… [SEP]`, at most `max` ids.
    fn encode(&self, text: &str, max: usize) -> Vec<u32> {
        let mut ids = vec![self.cls];
        'words: for word in self.basic(text) {
            for id in self.wordpiece(&word) {
                if ids.len() + 1 >= max {
                    break 'words;
                }
                ids.push(id);
            }
        }
        ids.push(self.sep);
        ids
    }

    fn basic(&self, text: &str) -> Vec<String> {
        let mut spaced = String::with_capacity(text.len() + 16);
        for c in text.chars() {
            if c == '\0' || c == '\u{fffd}' || (c.is_control() && !c.is_whitespace()) {
                continue;
            }
            if c.is_whitespace() {
                spaced.push(' ');
            } else if is_cjk(c) {
                spaced.push(' ');
                spaced.push(c);
                spaced.push(' ');
            } else {
                spaced.push(c);
            }
        }
        let mut words = Vec::new();
        for token in spaced.split(' ').filter(|t| !t.is_empty()) {
            let token: String = if self.lowercase {
                token
                    .to_lowercase()
                    .nfd()
                    .filter(|c| !is_combining_mark(*c))
                    .collect()
            } else {
                token.to_string()
            };
            let mut cur = String::new();
            for c in token.chars() {
                if is_punctuation(c) {
                    if !cur.is_empty() {
                        words.push(std::mem::take(&mut cur));
                    }
                    words.push(c.to_string());
                } else {
                    cur.push(c);
                }
            }
            if !cur.is_empty() {
                words.push(cur);
            }
        }
        words
    }

    fn wordpiece(&self, word: &str) -> Vec<u32> {
        let chars: Vec<char> = word.chars().collect();
        if chars.len() > MAX_WORD_CHARS {
            return vec![self.unk];
        }
        let mut out = Vec::new();
        let mut start = 0;
        while start < chars.len() {
            let mut end = chars.len();
            let mut found = None;
            while start < end {
                let piece: String = chars[start..end].iter().collect();
                let piece = if start > 0 {
                    format!("##{piece}")
                } else {
                    piece
                };
                if let Some(id) = self.vocab.get(&piece) {
                    found = Some(*id);
                    break;
                }
                end -= 1;
            }
            match found {
                Some(id) => out.push(id),
                None => return vec![self.unk],
            }
            start = end;
        }
        out
    }
}

fn is_cjk(c: char) -> bool {
    matches!(c as u32,
        0x4E00..=0x9FFF | 0x3400..=0x4DBF | 0x20000..=0x2A6DF | 0x2A700..=0x2B73F
        | 0x2B740..=0x2B81F | 0x2B820..=0x2CEAF | 0xF900..=0xFAFF | 0x2F800..=0x2FA1F)
}

/// BERT counts all non-alphanumeric ASCII symbols as punctuation, plus
/// Unicode's punctuation blocks.
fn is_punctuation(c: char) -> bool {
    c.is_ascii_punctuation()
        || matches!(c as u32,
            0x00A1..=0x00BF | 0x2010..=0x2027 | 0x2030..=0x205E | 0x3001..=0x3003
            | 0x3008..=0x3011 | 0x3014..=0x301F | 0xFF01..=0xFF0F | 0xFF1A..=0xFF20)
            && !c.is_alphanumeric()
}

/// Nonspacing combining marks (the accents NFD splits off).
fn is_combining_mark(c: char) -> bool {
    matches!(c as u32, 0x0300..=0x036F | 0x1AB0..=0x1AFF | 0x1DC0..=0x1DFF | 0x20D0..=0x20FF | 0xFE20..=0xFE2F)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> WordPiece {
        let vocab = "[PAD]\n[UNK]\n[CLS]\n[SEP]\ndeploy\n##ing\nthe\napi\n-\n,\ncafe\nv\n##2\n";
        WordPiece::new(vocab, true).unwrap()
    }

    #[test]
    fn wordpiece_splits_words_punctuation_and_accents() {
        let t = tiny();
        // [CLS] deploy ##ing the api - v ##2 , cafe [UNK] [SEP]
        assert_eq!(
            t.encode("Deploying  the API-v2, Café zzz", 64),
            vec![2, 4, 5, 6, 7, 8, 11, 12, 9, 10, 1, 3]
        );
    }

    #[test]
    fn encoding_is_truncated_with_sep_kept() {
        let t = tiny();
        assert_eq!(t.encode("the the the the", 4), vec![2, 6, 6, 3]);
        assert_eq!(t.encode("", 4), vec![2, 3]);
    }

    #[test]
    fn a_vocabulary_without_special_tokens_is_refused() {
        assert!(WordPiece::new("a\nb\n", true).is_none());
    }

    /// Runs against a real model when `TASK_QUEUE_TEST_MODEL_DIR` names one
    /// (`scripts/install-model.sh` installs it); token ids checked against
    /// the reference BERT tokenizer of all-MiniLM-L6-v2.
    #[test]
    fn matches_the_reference_tokenizer_of_the_installed_model() {
        let Ok(dir) = std::env::var("TASK_QUEUE_TEST_MODEL_DIR") else {
            eprintln!("TASK_QUEUE_TEST_MODEL_DIR unset; skipped");
            return;
        };
        let vocab = std::fs::read_to_string(Path::new(&dir).join("vocab.txt")).unwrap();
        let t = WordPiece::new(&vocab, true).unwrap();
        // Ids printed by the `tokenizers` library from the model's
        // tokenizer.json.
        let cases: [(&str, &[u32]); 3] = [
            (
                "Deploy the payments API to production (blue/green), then run smoke-tests!",
                &[
                    101, 21296, 1996, 10504, 17928, 2000, 2537, 1006, 2630, 1013, 2665, 1007, 1010,
                    2059, 2448, 5610, 1011, 5852, 999, 102,
                ],
            ),
            (
                "Caf\u{e9} na\u{ef}ve r\u{e9}sum\u{e9} \u{2014} \u{65e5}\u{672c}\u{8a9e} test_case_42 k8s",
                &[
                    101, 7668, 15743, 13746, 1517, 1864, 1876, 1950, 3231, 1035, 2553, 1035, 4413,
                    1047, 2620, 2015, 102,
                ],
            ),
            (
                "rollback db migration v2.3.1 after FAILED health-check",
                &[
                    101, 4897, 5963, 16962, 9230, 1058, 2475, 1012, 1017, 1012, 1015, 2044, 3478,
                    2740, 1011, 4638, 102,
                ],
            ),
        ];
        for (text, want) in cases {
            assert_eq!(t.encode(text, 256), want, "{text}");
        }
    }
}

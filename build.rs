//! `sqlx::migrate!` embeds the files of `migrations/` at compile time but
//! does not watch the directories: without this, a new migration file
//! would not rebuild the crate.
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}

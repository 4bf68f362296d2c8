//! Embeds `assets/` into the binary (compressed, with content-hashed routes), so a copied
//! binary serves its pages complete. See `src/web/assets.rs`.

fn main() {
    memory_serve::load_directory("./assets");
}

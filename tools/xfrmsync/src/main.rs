mod parse;
mod rules_file;
fn main() {}

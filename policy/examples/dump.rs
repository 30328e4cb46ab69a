#![allow(clippy::unwrap_used)] // a developer tool
fn main() {
    let dir = std::env::args().nth(1).unwrap();
    let r = netport_policy::load(std::path::Path::new(&dir)).unwrap();
    print!("{}", r.render_plain());
    println!("{:?}", r.tests);
}

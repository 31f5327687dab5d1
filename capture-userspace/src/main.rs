fn main() {
    println!("{}", capture::ebpf::PROGRAMS.len());
}

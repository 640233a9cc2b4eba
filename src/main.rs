fn main() -> std::process::ExitCode {
    imgsync::cli::main()
}
